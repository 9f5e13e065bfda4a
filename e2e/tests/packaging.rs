//! The Helm chart and the plain manifests rendered from it: they stay in sync with the
//! code (CRDs, deploy/, metric names), reject bad values by name, and install on the
//! real API server, with Helm and with `kubectl apply`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail, ensure};
use serde_json::Value;
use siterecovery_e2e::operator::{TempDir, helm_path, render_chart};
use siterecovery_e2e::{TestNamespace, client, install_crds, kubectl, repo_root};

/// What deploy/ is rendered with (hack/render-deploy.sh).
const DEPLOY_RELEASE: &str = "siterecovery";
const DEPLOY_NAMESPACE: &str = "siterecovery-system";
const REGENERATE: &str = "run `make generate` (hack/render-deploy.sh) and commit the result";

/// Every optional part of the chart switched on.
const ALL_ON: [&str; 10] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
    "--set",
    "agent.daemonSet.enabled=true",
    "--set",
    "workloadIdentity.enabled=true",
];

/// Runs helm; returns (success, stdout, stderr).
fn helm(args: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(helm_path()).args(args).output().context("running helm")?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

fn chart() -> String {
    repo_root().join("charts/siterecovery").to_string_lossy().into_owned()
}

/// The files of a directory, sorted by name, as (name, bytes).
fn files(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            out.push((name, std::fs::read(&path)?));
        }
    }
    out.sort();
    Ok(out)
}

/// Fails naming the first file that is missing, extra or different between two directories.
fn assert_same_files(generated: &Path, committed: &Path, hint: &str) -> anyhow::Result<()> {
    let (want, got) = (files(generated)?, files(committed)?);
    let names = |f: &[(String, Vec<u8>)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    ensure!(
        names(&want) == names(&got),
        "{} holds {:?}, expected {:?}: {hint}",
        committed.display(),
        names(&got),
        names(&want)
    );
    for ((name, want), (_, got)) in want.iter().zip(&got) {
        if want != got {
            let line = String::from_utf8_lossy(want)
                .lines()
                .zip(String::from_utf8_lossy(got).lines())
                .position(|(a, b)| a != b)
                .map_or_else(|| "its length".to_owned(), |i| format!("line {}", i + 1));
            bail!("{}/{name} differs from what is generated (first at {line}): {hint}", committed.display());
        }
    }
    Ok(())
}

#[test]
fn deploy_and_chart_crds_are_up_to_date() -> anyhow::Result<()> {
    let root = repo_root();
    assert_same_files(
        &root.join("crds"),
        &root.join("charts/siterecovery/crds"),
        "the chart's CRDs must equal crds/: run `make generate`",
    )?;
    let tmp = TempDir::new("deploy")?;
    let out = Command::new(root.join("hack/render-deploy.sh"))
        .arg(&tmp.0)
        .env("HELM", helm_path())
        .output()
        .context("running hack/render-deploy.sh")?;
    ensure!(out.status.success(), "hack/render-deploy.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_same_files(&tmp.0, &root.join("deploy"), REGENERATE)?;

    // deploy/ is the chart with its defaults: every CRD and the operator, nothing optional.
    let text = std::fs::read_to_string(root.join("deploy/siterecovery.yaml"))?;
    let docs = yaml_documents(&text)?;
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "CustomResourceDefinition").count(), 4, "{kinds:?}");
    assert_eq!(kinds.first(), Some(&"Namespace"), "the namespace comes first: {kinds:?}");
    for kind in ["Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Service"]
    {
        assert!(kinds.contains(&kind), "deploy/ has no {kind}: {kinds:?}");
    }
    for kind in ["DaemonSet", "ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"] {
        assert!(!kinds.contains(&kind), "deploy/ renders the optional {kind}");
    }
    assert!(!text.contains("managed-by: Helm"), "plain manifests must not claim Helm manages them");
    Ok(())
}

#[test]
fn helm_lint_passes_and_bad_values_are_named() -> anyhow::Result<()> {
    let chart = chart();
    let (ok, out, err) = helm(&["lint", &chart, "--strict"])?;
    assert!(ok, "helm lint failed:\n{out}{err}");
    let mut all_on = vec!["lint", "--strict", chart.as_str()];
    all_on.extend(ALL_ON);
    let (ok, out, err) = helm(&all_on)?;
    assert!(ok, "helm lint with every option on failed:\n{out}{err}");

    // values.schema.json: each bad value is refused, and the error names it.
    for (set, named) in [
        ("operator.logFormat=xml", "/operator/logFormat"),
        ("operator.replicas=0", "/operator/replicas"),
        ("operator.metricsPort=70000", "/operator/metricsPort"),
        ("processServer.cacheSize=lots", "/processServer/cacheSize"),
        ("processServer.image.pullPolicy=Sometimes", "/processServer/image/pullPolicy"),
        ("metrics.serviceMonitor.enabled=yes", "/metrics/serviceMonitor/enabled"),
        ("agent.daemonSet.hostConfigPath=relative", "/agent/daemonSet/hostConfigPath"),
        ("workloadIdentity.enabled=yes", "/workloadIdentity/enabled"),
        ("workloadIdentity.clientId=my-app", "/workloadIdentity/clientId"),
        ("operator.logFromat=text", "logFromat"),
    ] {
        let (ok, _, err) = helm(&["template", "x", &chart, "--kube-version", "1.34.4", "--set", set])?;
        assert!(!ok, "helm template accepted --set {set}");
        assert!(err.contains(named), "the error for --set {set} does not name {named}:\n{err}");
    }
    Ok(())
}

/// Every YAML document of a text, nulls dropped.
fn yaml_documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value: Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The metric families the operator and the process server register, with their
/// exposed names (prefix, name, unit suffix), read from the code that registers them.
fn exported_metrics() -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for file in ["operator/src/telemetry.rs", "process-server/src/metrics.rs"] {
        let src = std::fs::read_to_string(repo_root().join(file))?;
        let literal = |s: &str| s.split('"').nth(1).map(str::to_owned);
        let prefix = src
            .split_once("with_prefix(")
            .and_then(|(_, rest)| literal(rest))
            .with_context(|| format!("{file}: no registry prefix"))?;
        for (at, _) in src.match_indices(".register") {
            let call = &src[at..];
            let call = &call[..call.find(';').unwrap_or(call.len())];
            let name = literal(call).with_context(|| format!("{file}: a register call without a name"))?;
            let unit = if !call.starts_with(".register_with_unit(") {
                ""
            } else if call.contains("Unit::Seconds") {
                "_seconds"
            } else if call.contains("Unit::Bytes") {
                "_bytes"
            } else {
                bail!("{file}: unit of {name} not known to this test")
            };
            names.insert(format!("{prefix}_{name}{unit}"));
        }
    }
    ensure!(names.len() >= 10, "found too few metrics in the code: {names:?}");
    Ok(names)
}

/// The `siterecovery_…` metric names a text refers to.
fn referenced_metrics(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("siterecovery_") {
        let name: String =
            text[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        out.insert(name);
    }
    out
}

/// A referenced series name is exported when it is a family, or a family's counter or
/// histogram series.
fn is_exported(name: &str, exported: &BTreeSet<String>) -> bool {
    exported.contains(name)
        || ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| exported.contains(base)))
}

#[test]
fn monitoring_renders_only_when_enabled_and_uses_metrics_that_exist() -> anyhow::Result<()> {
    let optional = ["ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap", "DaemonSet"];
    let defaults = render_chart("sr", "siterecovery-system", &[])?;
    for kind in optional {
        assert!(of_kind(&defaults, kind).is_empty(), "{kind} renders with the default values");
    }
    let docs = render_chart("sr", "siterecovery-system", &ALL_ON)?;
    for kind in optional {
        assert_eq!(of_kind(&docs, kind).len(), 1, "exactly one {kind} when enabled");
    }

    // The ServiceMonitor finds the operator's metrics Service by its labels and port.
    let monitor = of_kind(&docs, "ServiceMonitor")[0];
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().context("ServiceMonitor selector")?;
    let port = monitor["spec"]["endpoints"][0]["port"].as_str().context("ServiceMonitor port")?;
    let selected: Vec<_> = of_kind(&docs, "Service")
        .into_iter()
        .filter(|s| selector.iter().all(|(k, v)| &s["metadata"]["labels"][k] == v))
        .filter(|s| s["spec"]["ports"].as_array().is_some_and(|ps| ps.iter().any(|p| p["name"] == port)))
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor selects one Service with a {port:?} port");
    assert_eq!(selected[0]["spec"]["ports"][0]["targetPort"], "metrics");
    let deployment = of_kind(&docs, "Deployment")[0];
    let container_ports = &deployment["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert!(container_ports.as_array().is_some_and(|ps| ps.iter().any(|p| p["name"] == "metrics")));

    // The PodMonitor selects the pods the operator builds (operator/src/processserver/fleet.rs),
    // through their replication port, and scrapes the process server's metrics port.
    let fleet = std::fs::read_to_string(repo_root().join("operator/src/processserver/fleet.rs"))?;
    let registration = std::fs::read_to_string(repo_root().join("operator/src/registration/mod.rs"))?;
    let process_server_main = std::fs::read_to_string(repo_root().join("process-server/src/main.rs"))?;
    let pods = of_kind(&docs, "PodMonitor")[0];
    let labels = &pods["spec"]["selector"]["matchLabels"];
    let name = labels["app.kubernetes.io/name"].as_str().context("PodMonitor name label")?;
    let component = labels["app.kubernetes.io/component"].as_str().context("PodMonitor component label")?;
    assert!(registration.contains(&format!("PROCESS_SERVER_SERVICE: &str = \"{name}\"")), "pods are not named {name}");
    assert!(fleet.contains(&format!("COMPONENT: &str = \"{component}\"")), "pods are not component {component}");
    let endpoint = &pods["spec"]["podMetricsEndpoints"][0];
    assert!(fleet.contains(&format!("PORT_NAME: &str = {:?}", endpoint["port"].as_str().unwrap_or_default())));
    assert!(process_server_main.contains("default_value = \"0.0.0.0:9090\""), "process servers moved /metrics");
    assert!(endpoint.to_string().contains(":9090"), "the PodMonitor does not scrape port 9090: {endpoint}");

    // Alerts and dashboard name only metrics the code exports, and cover what they promise.
    let exported = exported_metrics()?;
    let rules = serde_json::to_string(of_kind(&docs, "PrometheusRule")[0])?;
    let dashboard = std::fs::read_to_string(repo_root().join("charts/siterecovery/dashboards/siterecovery.json"))?;
    let config_map = of_kind(&docs, "ConfigMap")[0];
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(config_map["data"]["siterecovery.json"].as_str().map(str::trim_end), Some(dashboard.trim_end()));
    let parsed: Value = serde_json::from_str(&dashboard).context("the dashboard is not JSON")?;
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8), "dashboard panels");
    for (what, text) in [("PrometheusRule", &rules), ("dashboard", &dashboard)] {
        let used = referenced_metrics(text);
        for name in &used {
            assert!(is_exported(name, &exported), "the {what} uses {name}, which no code exports ({exported:?})");
        }
        for needed in [
            "siterecovery_server_rpo_seconds",
            "siterecovery_process_server_backlog_bytes",
            "siterecovery_process_server_upload_errors_total",
            "siterecovery_reconcile_errors_total",
        ] {
            assert!(used.contains(needed), "the {what} does not use {needed}");
        }
    }
    for needed in [
        "siterecovery_servers",
        "siterecovery_reconcile_duration_seconds_bucket",
        "siterecovery_process_server_uploaded_bytes_total",
    ] {
        assert!(referenced_metrics(&dashboard).contains(needed), "the dashboard has no panel on {needed}");
    }
    for alert in [
        "SiteRecoveryRpoBreached",
        "SiteRecoveryUploadErrors",
        "SiteRecoveryConsistencyGroupStalled",
        "SiteRecoveryProcessServerBacklog",
        "SiteRecoveryProcessServerCacheFull",
        "SiteRecoveryProcessServerDown",
        "SiteRecoveryReconcileErrors",
    ] {
        assert!(rules.contains(&format!("\"alert\":\"{alert}\"")), "no {alert} alert");
    }
    Ok(())
}

#[test]
fn agent_daemonset_runs_with_tracking_capabilities_not_privileged() -> anyhow::Result<()> {
    let docs = render_chart("sr", "siterecovery-system", &ALL_ON)?;
    let ds = of_kind(&docs, "DaemonSet")[0];
    let pod = &ds["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(
        container["args"],
        serde_json::json!(["run", "--config=/etc/siterecovery/agent.json", "--log-json"]),
        "{container}"
    );
    let security = &container["securityContext"];
    assert_eq!(security["privileged"], Value::Null, "privileged by default: {security}");
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(security["capabilities"]["add"], serde_json::json!(["BPF", "PERFMON", "SYS_RESOURCE"]));
    assert_eq!(pod["automountServiceAccountToken"], false);
    // Only the node's agent directory (the agent renews its credentials there) and the bpf
    // filesystem (the change tracker pins itself there) are writable.
    for mount in container["volumeMounts"].as_array().context("volume mounts")? {
        let writable = mount["mountPath"] == "/etc/siterecovery" || mount["mountPath"] == "/sys/fs/bpf";
        assert_eq!(mount["readOnly"], !writable, "{mount}");
    }
    let paths: Vec<_> =
        pod["volumes"].as_array().context("volumes")?.iter().map(|v| v["hostPath"]["path"].clone()).collect();
    assert_eq!(paths, ["/etc/siterecovery", "/dev", "/sys/kernel/btf", "/sys/fs/bpf"].map(Value::from));

    let mut secret = ALL_ON.to_vec();
    secret.extend(["--set", "agent.daemonSet.configSecret=node-1-agent", "--set", "agent.daemonSet.privileged=true"]);
    let docs = render_chart("sr", "siterecovery-system", &secret)?;
    let pod = &of_kind(&docs, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "node-1-agent");
    assert_eq!(pod["containers"][0]["volumeMounts"][0]["readOnly"], true, "a Secret mount is read-only");
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
    Ok(())
}

#[test]
fn workload_identity_labels_the_operator_and_configures_the_process_servers() -> anyhow::Result<()> {
    const CLIENT_ID: &str = "6f1f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b";
    let deployment = |docs: &[Value]| of_kind(docs, "Deployment")[0].clone();
    let env = |d: &Value, name: &str| -> Option<Value> {
        d["spec"]["template"]["spec"]["containers"][0]["env"].as_array()?.iter().find(|e| e["name"] == name).cloned()
    };
    let off = render_chart("sr", "siterecovery-system", &[])?;
    let d = deployment(&off);
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"], Value::Null);
    assert_eq!(env(&d, "SR_PROCESS_SERVER_WORKLOAD_IDENTITY"), None);

    let client_id = format!("workloadIdentity.clientId={CLIENT_ID}");
    let on =
        render_chart("sr", "siterecovery-system", &["--set", "workloadIdentity.enabled=true", "--set", &client_id])?;
    let d = deployment(&on);
    assert_eq!(d["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"], "true");
    assert_eq!(d["spec"]["selector"]["matchLabels"]["azure.workload.identity/use"], Value::Null, "selector unchanged");
    assert_eq!(env(&d, "SR_PROCESS_SERVER_WORKLOAD_IDENTITY").context("env")?["value"], "true");
    assert_eq!(env(&d, "SR_PROCESS_SERVER_WORKLOAD_IDENTITY_CLIENT_ID").context("env")?["value"], CLIENT_ID);
    let account = of_kind(&on, "ServiceAccount").into_iter().find(|a| a["metadata"]["name"] == "sr-operator");
    assert_eq!(
        account.context("operator ServiceAccount")?["metadata"]["annotations"]["azure.workload.identity/client-id"],
        CLIENT_ID
    );
    Ok(())
}

#[test]
fn kustomize_renders_deploy() -> anyhow::Result<()> {
    let deploy = repo_root().join("deploy");
    let out = kubectl(&["kustomize", &deploy.to_string_lossy()], None)?;
    let docs = yaml_documents(&out)?;
    let committed = yaml_documents(&std::fs::read_to_string(deploy.join("siterecovery.yaml"))?)?;
    assert_eq!(docs.len(), committed.len(), "kustomize renders every object of deploy/siterecovery.yaml");
    assert!(docs.iter().any(|d| d["kind"] == "Deployment" && d["metadata"]["namespace"] == DEPLOY_NAMESPACE));
    Ok(())
}

/// `kubectl get <what> -o json`, or None when it does not exist.
fn get(what: &str, namespace: &str) -> anyhow::Result<Option<Value>> {
    let out = kubectl(&["get", what, "-n", namespace, "-o", "json", "--ignore-not-found"], None)?;
    if out.trim().is_empty() { Ok(None) } else { Ok(Some(serde_json::from_str(&out)?)) }
}

#[tokio::test]
async fn helm_install_creates_the_operator_and_uninstall_removes_it() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    let ns = TestNamespace::create(&client, "helm").await?;
    // Named after the namespace, so cluster-scoped names are this test's own.
    let release = ns.name.clone();
    let (ok, out, err) = helm(&[
        "install",
        &release,
        &chart(),
        "--namespace",
        &ns.name,
        "--set",
        &format!("operator.watchNamespace={}", ns.name),
    ])?;
    let result = (|| -> anyhow::Result<()> {
        ensure!(ok, "helm install failed:\n{out}{err}");
        let operator = format!("{release}-operator");
        let deployment = get(&format!("deployment/{operator}"), &ns.name)?.context("no operator Deployment")?;
        let env = &deployment["spec"]["template"]["spec"]["containers"][0]["env"];
        let watch = env.as_array().and_then(|e| e.iter().find(|v| v["name"] == "SR_WATCH_NAMESPACE"));
        assert_eq!(watch.map(|v| &v["value"]), Some(&Value::from(ns.name.clone())), "{env}");
        for what in [
            format!("serviceaccount/{operator}"),
            format!("role/{operator}-leader-election"),
            format!("rolebinding/{operator}-leader-election"),
            format!("service/{operator}-registration"),
            format!("service/{operator}-metrics"),
            format!("clusterrole/{operator}"),
            format!("clusterrolebinding/{operator}"),
            format!("clusterrole/{release}-process-server"),
        ] {
            ensure!(get(&what, &ns.name)?.is_some(), "helm install did not create {what}");
        }
        Ok(())
    })();
    let (ok, out, err) = helm(&["uninstall", &release, "--namespace", &ns.name, "--wait"])?;
    result?;
    ensure!(ok, "helm uninstall failed:\n{out}{err}");
    ensure!(get(&format!("clusterrole/{release}-operator"), &ns.name)?.is_none(), "uninstall left the ClusterRole");
    Ok(())
}

/// Who else owns deploy/'s cluster-scoped objects on this cluster, if anyone: a Helm
/// release (such as `make demo`'s) with the same names.
fn foreign_owner() -> anyhow::Result<Option<String>> {
    for what in [format!("clusterrole/{DEPLOY_RELEASE}-operator"), format!("deployment/{DEPLOY_RELEASE}-operator")] {
        if let Some(object) = get(&what, DEPLOY_NAMESPACE)? {
            let annotations = &object["metadata"]["annotations"];
            if let Some(release) = annotations["meta.helm.sh/release-name"].as_str() {
                let namespace = annotations["meta.helm.sh/release-namespace"].as_str().unwrap_or_default();
                return Ok(Some(format!("{what} belongs to Helm release {release} in {namespace}")));
            }
        }
    }
    Ok(None)
}

#[tokio::test]
async fn plain_manifests_apply_server_side() -> anyhow::Result<()> {
    let client = client().await?;
    install_crds(&client).await?;
    if let Some(owner) = foreign_owner()? {
        eprintln!(
            "SKIPPED plain_manifests_apply_server_side: {owner}; deploy/ would take its objects over. \
             Run against a cluster without that release (`make test` uses its own)."
        );
        return Ok(());
    }
    let namespace_existed = get(&format!("namespace/{DEPLOY_NAMESPACE}"), DEPLOY_NAMESPACE)?.is_some();
    let deploy = repo_root().join("deploy");
    let applied = kubectl(&["apply", "--server-side", "-f", &deploy.to_string_lossy()], None);

    let docs = yaml_documents(&std::fs::read_to_string(deploy.join("siterecovery.yaml"))?)?;
    let result = (|| -> anyhow::Result<()> {
        applied?;
        let deployment = get(&format!("deployment/{DEPLOY_RELEASE}-operator"), DEPLOY_NAMESPACE)?
            .context("kubectl apply -f deploy/ created no operator Deployment")?;
        assert_eq!(deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"], "kubectl");
        for doc in docs.iter().filter(|d| d["kind"] != "CustomResourceDefinition") {
            let what = format!(
                "{}/{}",
                doc["kind"].as_str().unwrap_or_default(),
                doc["metadata"]["name"].as_str().unwrap_or_default()
            );
            ensure!(
                get(&what.to_lowercase(), DEPLOY_NAMESPACE)?.is_some(),
                "kubectl apply -f deploy/ did not create {what}"
            );
        }
        Ok(())
    })();

    // Clean up everything but the CRDs (other tests use them) and a namespace that was
    // there before.
    let mut objects: Vec<String> = docs
        .iter()
        .filter(|d| d["kind"] != "CustomResourceDefinition" && d["kind"] != "Namespace")
        .map(|d| {
            format!("{}/{}", d["kind"].as_str().unwrap_or_default(), d["metadata"]["name"].as_str().unwrap_or_default())
                .to_lowercase()
        })
        .collect();
    if !namespace_existed {
        objects.push(format!("namespace/{DEPLOY_NAMESPACE}"));
    }
    let mut args = vec!["delete", "-n", DEPLOY_NAMESPACE, "--ignore-not-found", "--wait=false"];
    args.extend(objects.iter().map(String::as_str));
    let deleted = kubectl(&args, None);
    result?;
    deleted?;
    Ok(())
}
