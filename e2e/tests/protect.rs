//! Lifecycle step 1, protect: two servers with two disks each (one of an odd size, one
//! sparse) under a policy with a 5 s crash-consistent interval. Everything runs for real:
//! the operator as the chart's ServiceAccount, its process-server StatefulSet's pod as a
//! local process with the pod's own ServiceAccount (`siterecovery_e2e::pods`), the agents
//! as local processes with the certificates the operator issued, Azurite as Blob storage.
//! The servers must reach Protected, with recovery points in status that restore bit-exact.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_e2e::operator::{OperatorTest, TempDir};
use siterecovery_e2e::pods::{PodRunner, bin_dir};
use siterecovery_e2e::{fixtures, wait_for};
use siterecovery_store::{AzureBlobBackend, Keyring, ServerRef, Store, StoreOptions};

const MIB: u64 = 1024 * 1024;
const PS_POD: &str = "siterecovery-process-server-0";

fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    ensure!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`; make test does)",
        path.display()
    );
    Ok(path)
}

/// Writes `len` bytes of varied content at `offset` of `path`.
fn write_pattern(path: &Path, offset: u64, len: usize, seed: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let buf: Vec<u8> = (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 8192 < 4096 { x as u8 } else { (i / 8192) as u8 }
        })
        .collect();
    let f = std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(path)?;
    f.write_all_at(&buf, offset)?;
    f.sync_all()?;
    Ok(())
}

struct AgentProcess(Child, PathBuf);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts an agent for `server` with the client certificate the operator issued.
async fn start_agent(
    admin: &kube::Client,
    ns: &str,
    server: &str,
    disks: &[(&str, PathBuf)],
    port: u16,
    dir: &Path,
) -> anyhow::Result<AgentProcess> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    let tls =
        wait_for(&secrets, &format!("sr-agent-{server}-tls"), Duration::from_secs(60), "the agent certificate", |_| {
            true
        })
        .await?;
    let data: BTreeMap<String, Vec<u8>> = tls.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    let base = dir.join(server);
    std::fs::create_dir_all(&base)?;
    for f in ["tls.crt", "tls.key", "ca.crt"] {
        std::fs::write(base.join(f), data.get(f).with_context(|| format!("agent Secret without {f}"))?)?;
    }
    let config = serde_json::json!({
        "namespace": ns, "server": server,
        "disks": disks.iter().map(|(id, p)| serde_json::json!({"id": id, "path": p})).collect::<Vec<_>>(),
        "processServer": format!("localhost:{port}"),
        "clientCert": base.join("tls.crt"), "clientKey": base.join("tls.key"), "caBundle": base.join("ca.crt"),
        "intervalSeconds": 1.0,
    });
    let config_path = base.join("agent.json");
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let log = base.join("agent.log");
    let child = Command::new(binary("siterecovery-agent")?)
        .arg("--config")
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?))
        .spawn()?;
    Ok(AgentProcess(child, log))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_replicate_and_their_points_restore_bit_exact() -> anyhow::Result<()> {
    let t = OperatorTest::start(&binary("siterecovery-operator")?, "protect").await?;
    let ns = t.ns.name.clone();
    let runner = PodRunner::start(
        t.admin.clone(),
        &ns,
        "app.kubernetes.io/component=process-server",
        bin_dir(),
        vec![
            ("SR_LISTEN".into(), "127.0.0.1:0".into()),
            ("SR_METRICS".into(), "127.0.0.1:0".into()),
            ("RUST_LOG".into(), "info".into()),
        ],
    )?;
    let result = protect(&t, &ns, &runner).await;
    if result.is_err() {
        eprintln!("--- process server log ---\n{}", runner.logs(PS_POD));
    }
    t.explain(result)
}

async fn protect(t: &OperatorTest, ns: &str, runner: &PodRunner) -> anyhow::Result<()> {
    let pp = PostParams::default();
    Api::<Secret>::namespaced(t.admin.clone(), ns).create(&pp, &fixtures::sas_secret()).await?;
    let policies: Api<ReplicationPolicy> = Api::namespaced(t.admin.clone(), ns);
    policies.create(&pp, &fixtures::policy("gold")).await?;
    let servers: Api<ProtectedServer> = Api::namespaced(t.admin.clone(), ns);

    let dir = TempDir::new("protect")?;
    let mut layout = Vec::new();
    for (name, seed) in [("db-01", 1u64), ("app-01", 2)] {
        let (os, data) = (dir.0.join(format!("{name}-os.img")), dir.0.join(format!("{name}-data.img")));
        // An odd-sized disk full of data, and a sparse one with a little data in it.
        write_pattern(&os, 0, (6 * MIB + 4_321) as usize, seed)?;
        std::fs::File::create(&data)?.set_len(24 * MIB)?;
        write_pattern(&data, 9 * MIB + 7, 100_000, seed + 10)?;
        let mut s = fixtures::server(name);
        s.spec.disks = serde_json::from_value(serde_json::json!([
            {"id": "os", "path": os}, {"id": "data", "path": data}
        ]))?;
        servers.create(&pp, &s).await?;
        layout.push((name, vec![("os", os), ("data", data)]));
    }

    // The operator creates the fleet; the runner starts its pod; the pod's heartbeat makes
    // it eligible, and the operator assigns both servers to it.
    for (name, _) in &layout {
        wait_for(&servers, name, Duration::from_secs(90), "assignment to the process server", |s: &ProtectedServer| {
            s.status.as_ref().and_then(|st| st.process_server.as_deref()) == Some(PS_POD)
        })
        .await?;
    }
    let port = runner.wait_port(PS_POD, 9443, Duration::from_secs(30)).await?;
    let mut agents = Vec::new();
    for (name, disks) in &layout {
        let d: Vec<(&str, PathBuf)> = disks.iter().map(|(id, p)| (*id, p.clone())).collect();
        agents.push(start_agent(&t.admin, ns, name, &d, port, &dir.0).await?);
    }

    // The process server writes each point into the server's status.
    let mut points = Vec::new();
    for (name, _) in &layout {
        let s = wait_for(
            &servers,
            name,
            Duration::from_secs(120),
            "a crash-consistent point in status",
            |s: &ProtectedServer| {
                s.status
                    .as_ref()
                    .and_then(|st| st.latest_recovery_points.as_ref())
                    .and_then(|p| p.crash_consistent.as_ref())
                    .is_some()
            },
        )
        .await
        .map_err(|e| {
            let logs: Vec<String> = agents.iter().map(|a| std::fs::read_to_string(&a.1).unwrap_or_default()).collect();
            e.context(format!("agent logs: {logs:#?}"))
        })?;
        let p = s.status.unwrap().latest_recovery_points.unwrap().crash_consistent.unwrap();
        points.push((name, p.id));
    }

    // Restore each point from Azurite with the key the operator created and compare.
    let policy = policies.get("gold").await?;
    let keys = Api::<Secret>::namespaced(t.admin.clone(), ns).get(&policy.key_secret_name()).await?;
    let keyring =
        Keyring::from_secret_data(&keys.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())?;
    let backend = AzureBlobBackend::with_sas(&fixtures::azurite_endpoint(), "dr-data", &fixtures::azurite_sas())?;
    let store = Store::new(Arc::new(backend), keyring, StoreOptions::default())?;
    for ((name, id), (_, disks)) in points.iter().zip(&layout) {
        let server = ServerRef::new(ns, **name)?;
        let m = store.load_point(&server, id).await?;
        let out = dir.0.join(format!("restore-{name}"));
        std::fs::create_dir_all(&out)?;
        let targets: Vec<(String, PathBuf)> = disks.iter().map(|(id, _)| (id.to_string(), out.join(id))).collect();
        store.restore_point(&server, &m, &targets).await?;
        for (id, src) in disks {
            ensure!(
                std::fs::read(src)? == std::fs::read(out.join(id))?,
                "{name}/{id}: the restored point differs from the source"
            );
        }
    }
    drop(agents);
    Ok(())
}
