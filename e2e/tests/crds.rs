//! The four CRDs install, become Established, are documented by `kubectl explain`,
//! group under `kubectl get siterecovery`, and show their printer columns.

use siterecovery_e2e::{TestNamespace, client, example_documents, install_crds, kubectl};

#[tokio::test]
async fn crds_are_established_and_explained() -> anyhow::Result<()> {
    let client = client().await?;
    let crds = install_crds(&client).await?;
    assert_eq!(crds.len(), 4, "one CRD per kind");
    for (kind, field, expect) in [
        ("replicationpolicies", "spec.crashConsistentInterval", "How often a crash-consistent recovery point is taken"),
        ("protectedservers", "spec.disks", "Disks to protect"),
        ("protectedservers", "status.currentRpo", "Age of the latest recovery point"),
        ("recoveryplans", "spec.operation.recoveryPoint.selector", "How to choose"),
        ("failbackjobs", "spec.cutover.mode", "ReverseProtected"),
    ] {
        let out = kubectl(&["explain", &format!("{kind}.{field}")], None)?;
        assert!(out.contains(expect), "kubectl explain {kind}.{field} lacks {expect:?}:\n{out}");
    }
    for kind in ["ReplicationPolicy", "ProtectedServer", "RecoveryPlan", "FailbackJob"] {
        let out = kubectl(&["explain", &kind.to_lowercase()], None)?;
        assert!(out.contains(&format!("KIND:       {kind}")), "kubectl explain {kind}:\n{out}");
        assert!(out.contains("siterecovery.io/v1alpha1") || out.contains("siterecovery.io"), "{out}");
    }
    Ok(())
}

#[tokio::test]
async fn category_lists_every_kind_with_printer_columns() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, "columns").await?;
    for (_, doc) in example_documents()? {
        kubectl(&["apply", "--server-side", "-n", &ns.name, "-f", "-"], Some(&serde_json::to_string(&doc)?))?;
    }
    // Status as the operator, agent and process server will write it (status subresource).
    let status = serde_json::json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": "db-01"},
        "status": {
            "phase": "Protected", "currentRpo": "12s", "currentRpoSeconds": 12,
            "processServer": "siterecovery-process-server-1",
            "initialSync": {"bytesTotal": 100, "bytesDone": 100, "percent": "100%"},
            "latestRecoveryPoints": {"crashConsistent": {
                "id": "cc-0001", "time": "2026-11-27T10:00:00Z", "kind": "CrashConsistent"}}
        }
    });
    kubectl(
        &[
            "apply",
            "--server-side",
            "--subresource=status",
            "--field-manager=siterecovery-operator",
            "-n",
            &ns.name,
            "-f",
            "-",
        ],
        Some(&status.to_string()),
    )?;

    let all = kubectl(&["get", "siterecovery", "-n", &ns.name], None)?;
    for name in [
        "replicationpolicy.siterecovery.io/gold",
        "protectedserver.siterecovery.io/db-01",
        "protectedserver.siterecovery.io/web-01",
        "recoveryplan.siterecovery.io/billing",
        "failbackjob.siterecovery.io/billing-home",
    ] {
        assert!(all.contains(name), "`kubectl get siterecovery` lacks {name}:\n{all}");
    }

    for (short, header) in [
        ("rpol", ["NAME", "CRASH", "APP", "RETENTION", "RPO-ALERT", "SERVERS", "READY", "AGE"].as_slice()),
        ("psrv", &["NAME", "PHASE", "RPO", "LAST-POINT", "PROCESS-SERVER", "AGE"]),
        ("rplan", &["NAME", "OPERATION", "STATE", "GROUP", "SERVERS", "AGE"]),
        ("fbj", &["NAME", "STEP", "STATE", "TARGET", "SERVERS", "AGE"]),
    ] {
        let out = kubectl(&["get", short, "-n", &ns.name], None)?;
        let first: Vec<&str> = out.lines().next().unwrap_or_default().split_whitespace().collect();
        assert_eq!(first, header, "columns of `kubectl get {short}`:\n{out}");
    }
    let servers = kubectl(&["get", "psrv", "db-01", "-n", &ns.name, "--no-headers"], None)?;
    let cells: Vec<&str> = servers.split_whitespace().collect();
    assert_eq!(&cells[..3], ["db-01", "Protected", "12s"], "{servers}");
    assert_eq!(cells[4], "siterecovery-process-server-1", "{servers}");
    let wide = kubectl(&["get", "psrv", "db-01", "-n", &ns.name, "-o", "wide"], None)?;
    assert!(wide.contains("SYNC") && wide.contains("100%") && wide.contains("gold"), "{wide}");
    let policy = kubectl(&["get", "rpol", "gold", "-n", &ns.name, "--no-headers"], None)?;
    assert!(policy.split_whitespace().take(5).eq(["gold", "30s", "4h", "72h", "5m"]), "{policy}");
    Ok(())
}
