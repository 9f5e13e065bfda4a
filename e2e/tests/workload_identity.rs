//! Protect with workload identity, end to end: a policy whose credential is
//! `workloadIdentity`, the operator started as the chart starts it with
//! `workloadIdentity.enabled` (`SR_PROCESS_SERVER_WORKLOAD_IDENTITY=true`), and the pod
//! runner playing the AKS webhook: it runs only process-server pods labelled
//! `azure.workload.identity/use: "true"` and gives them the webhook's variables. Storage
//! is Azurite over HTTPS with `--oauth basic`; Entra ID's token endpoint is a loopback
//! stand-in that checks the client assertion is the projected token
//! (`siterecovery_e2e::entra`). The agent replicates, the process server uploads with the
//! token it exchanged, and the point restores bit-exact.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use serde_json::json;
use siterecovery_api::{ProtectedServer, ReplicationPolicy};
use siterecovery_e2e::entra::{CLIENT_ID, OauthStorage, TENANT, workload_identity};
use siterecovery_e2e::lifecycle::{MIB, PS_POD, binary, same_content, write_pattern};
use siterecovery_e2e::operator::{OperatorTest, TempDir};
use siterecovery_e2e::pods::{PodRunner, bin_dir};
use siterecovery_e2e::{fixtures, wait_for};
use siterecovery_store::{Keyring, ServerRef, Store, StoreOptions};

const CONTAINER: &str = "dr-wi";
const SERVER: &str = "db-01";

/// Kills the agent when the test ends.
struct Agent(Child, std::path::PathBuf);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_replicates_and_restores_through_workload_identity() -> anyhow::Result<()> {
    let storage = OauthStorage::start().await?;
    let mut operator_env = storage.pod_env();
    operator_env.push(("SR_PROCESS_SERVER_WORKLOAD_IDENTITY".into(), "true".into()));
    let t = OperatorTest::start_with_env(&binary("siterecovery-operator")?, "wi-protect", &operator_env).await?;
    let mut pod_env: Vec<(String, String)> = vec![
        ("SR_LISTEN".into(), "127.0.0.1:0".into()),
        ("SR_METRICS".into(), "127.0.0.1:0".into()),
        ("RUST_LOG".into(), "info".into()),
    ];
    pod_env.extend(storage.pod_env().into_iter().map(|(k, v)| (k, v.to_string_lossy().into_owned())));
    // The webhook mutates only labelled pods; the runner runs only those.
    let runner = PodRunner::start(
        t.admin.clone(),
        &t.ns.name,
        "app.kubernetes.io/component=process-server,azure.workload.identity/use=true",
        bin_dir(),
        pod_env,
    )?;
    let dir = TempDir::new("wi-protect")?;
    let mut agent = None;
    let result = scenario(&t, &storage, &runner, &dir, &mut agent).await;
    if result.is_err() {
        eprintln!("--- process server log ---\n{}", runner.logs(PS_POD));
        if let Some(Agent(_, log)) = &agent {
            eprintln!("--- agent log ---\n{}", std::fs::read_to_string(log).unwrap_or_default());
        }
        eprintln!("--- entra ---\n{:?}", *storage.entra.state());
    }
    t.explain(result)
}

async fn scenario(
    t: &OperatorTest,
    storage: &OauthStorage,
    runner: &PodRunner,
    dir: &TempDir,
    agent: &mut Option<Agent>,
) -> anyhow::Result<()> {
    let ns = t.ns.name.as_str();
    let pp = PostParams::default();
    let policy: ReplicationPolicy = serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ReplicationPolicy",
        "metadata": {"name": "gold"},
        "spec": {
            "rpoThreshold": "2m", "crashConsistentInterval": "5s", "retention": {"window": "24h"},
            "target": {"endpoint": storage.azurite.endpoint(), "container": CONTAINER,
                       "credential": {"workloadIdentity": {"clientId": CLIENT_ID, "tenantId": TENANT}}}
        }
    }))?;
    Api::<ReplicationPolicy>::namespaced(t.admin.clone(), ns).create(&pp, &policy).await?;
    let disk = dir.0.join("os.img");
    write_pattern(&disk, 0, (3 * MIB + 1_234) as usize, 7)?;
    let mut server = fixtures::server(SERVER);
    server.spec.disks = serde_json::from_value(json!([{"id": "os", "path": disk}]))?;
    server.spec.failover_target = serde_json::from_value(json!({"local": {"directory": dir.0.join("recovered")}}))?;
    let servers: Api<ProtectedServer> = Api::namespaced(t.admin.clone(), ns);
    servers.create(&pp, &server).await?;
    wait_for(&servers, SERVER, Duration::from_secs(90), "assignment to the process server", |p| {
        p.status.as_ref().and_then(|s| s.process_server.as_deref()) == Some(PS_POD)
    })
    .await?;
    let port = runner
        .wait_port(PS_POD, 9443, Duration::from_secs(60))
        .await
        .context("the process-server pod never ran: is it labelled azure.workload.identity/use?")?;

    let base = dir.0.join("agent");
    register(t, &base, &disk).await?;
    let config_path = base.join("agent.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["processServer"] = format!("localhost:{port}").into();
    config["intervalSeconds"] = 1.0.into();
    std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
    let log = base.join("agent.log");
    let child = Command::new(binary("siterecovery-agent")?)
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?))
        .spawn()?;
    *agent = Some(Agent(child, log));

    let s = wait_for(&servers, SERVER, Duration::from_secs(120), "a crash-consistent point in status", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.latest_recovery_points.as_ref())
            .and_then(|l| l.crash_consistent.as_ref())
            .is_some()
    })
    .await?;
    let id = s.status.and_then(|s| s.latest_recovery_points).and_then(|l| l.crash_consistent).context("point")?.id;

    // Read it back with the same identity (as a failover would) and compare.
    let keys = Api::<Secret>::namespaced(t.admin.clone(), ns).get("gold-encryption").await?;
    let keyring =
        Keyring::from_secret_data(&keys.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())?;
    let backend = storage.connector().backend(&storage.azurite.endpoint(), CONTAINER, &workload_identity())?;
    let store = Store::new(Arc::new(backend), keyring, StoreOptions::default())?;
    let server_ref = ServerRef::new(ns, SERVER)?;
    let manifest = store.load_point(&server_ref, &id).await?;
    let restored = dir.0.join("restored-os.img");
    store.restore_point(&server_ref, &manifest, &[("os".into(), restored.clone())]).await?;
    ensure!(same_content(&disk, &restored)?, "the restored point differs from the source disk");

    let entra = storage.entra.state();
    ensure!(entra.refused.is_empty(), "Entra refused: {:?}", entra.refused);
    // The operator (probe) and the process server (uploads) each exchanged their token.
    ensure!(entra.issued.get("assertion").is_some_and(|n| *n >= 2), "tokens issued: {:?}", entra.issued);
    Ok(())
}

/// `siterecovery-agent register` with the server's bootstrap token, as on a real server.
async fn register(t: &OperatorTest, base: &Path, disk: &Path) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(t.admin.clone(), &t.ns.name);
    let name = format!("sr-bootstrap-{SERVER}-token");
    let plain = wait_for(&secrets, &name, Duration::from_secs(60), "the bootstrap token", |_| true).await?;
    let data: BTreeMap<String, Vec<u8>> = plain.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    std::fs::create_dir_all(base)?;
    let ca = base.join("registration-ca.crt");
    std::fs::write(&ca, data.get("ca.crt").context("bootstrap Secret without ca.crt")?)?;
    let token = String::from_utf8(data.get("token").context("bootstrap Secret without token")?.clone())?;
    let out = Command::new(binary("siterecovery-agent")?)
        .arg("register")
        .arg("--url")
        .arg(format!("https://localhost:{}", t.operator.registration_addr.port()))
        .arg("--ca")
        .arg(&ca)
        .args(["--namespace", &t.ns.name, "--server", SERVER, "--hostname", &format!("{SERVER}.example.com")])
        .arg("--out")
        .arg(base)
        .arg("--disk")
        .arg(format!("os={}", disk.display()))
        .env("SR_BOOTSTRAP_TOKEN", token)
        .output()?;
    ensure!(
        out.status.success(),
        "siterecovery-agent register failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
