//! The world of the lifecycle tests: the operator as the chart's ServiceAccount, its
//! process-server pod run by the [`PodRunner`], servers with image-file disks, their
//! agents as local processes with the certificates the operator issued, and Azurite.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use siterecovery_api::plan::RunState;
use siterecovery_api::{ProtectedServer, RecoveryPlan, ReplicationPolicy};
use siterecovery_store::{AzureBlobBackend, Keyring, Manifest, ServerRef, Store, StoreOptions};

use crate::operator::{OperatorTest, TempDir};
use crate::pods::{PodRunner, bin_dir};
use crate::{fixtures, wait_for};

/// Mebibyte.
pub const MIB: u64 = 1024 * 1024;
/// The one process-server pod of a small fleet.
pub const PS_POD: &str = "siterecovery-process-server-0";

/// A workspace binary, or an error saying how to build it.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = bin_dir().join(name);
    ensure!(
        path.exists(),
        "{} is missing: build the workspace's binaries first (`cargo build --workspace --bins`; make test does)",
        path.display()
    );
    Ok(path)
}

/// Writes `len` bytes of varied content at `offset` of `path` (created if needed).
pub fn write_pattern(path: &Path, offset: u64, len: usize, seed: u64) -> anyhow::Result<()> {
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

/// An agent running as a local process; killed when dropped.
pub struct AgentProcess {
    child: Child,
    /// Its log.
    pub log: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One protected server of the world and its disk images.
pub struct Protected {
    /// ProtectedServer name.
    pub name: String,
    /// (disk id, image path).
    pub disks: Vec<(String, PathBuf)>,
}

impl Protected {
    /// Size of disk `i`'s image.
    pub fn disks_size(&self, i: usize) -> anyhow::Result<u64> {
        Ok(std::fs::metadata(&self.disks[i].1)?.len())
    }
}

/// Everything a lifecycle test runs against.
pub struct World {
    /// Operator, namespaces, admin client.
    pub t: OperatorTest,
    /// Runs the process-server pod.
    pub runner: PodRunner,
    /// Disk images, agent files, restores.
    pub dir: TempDir,
    /// The servers.
    pub servers: Vec<Protected>,
    /// Their agents, in the same order.
    pub agents: Vec<AgentProcess>,
    /// Loopback port of the process server.
    pub port: u16,
}

impl World {
    /// Starts the operator and the fleet, creates `gold` (5 s crash-consistent interval)
    /// and the named servers with two disks each (an odd-sized full one, `os`, and a
    /// sparse one, `data`), waits for their assignment and starts their agents.
    pub async fn start(prefix: &str, names: &[&str]) -> anyhow::Result<Self> {
        Self::start_grouped(prefix, names, None).await
    }

    /// [`World::start`], the servers sharing the consistency group `group` when given.
    pub async fn start_grouped(prefix: &str, names: &[&str], group: Option<&str>) -> anyhow::Result<Self> {
        let t = OperatorTest::start(&binary("siterecovery-operator")?, prefix).await?;
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
        let dir = TempDir::new(prefix)?;
        let mut world = Self { t, runner, dir, servers: Vec::new(), agents: Vec::new(), port: 0 };
        let r = world.setup(names, group).await;
        world.explain(r)?;
        Ok(world)
    }

    async fn setup(&mut self, names: &[&str], group: Option<&str>) -> anyhow::Result<()> {
        let ns = self.t.ns.name.clone();
        let pp = PostParams::default();
        Api::<Secret>::namespaced(self.t.admin.clone(), &ns).create(&pp, &fixtures::sas_secret()).await?;
        Api::<ReplicationPolicy>::namespaced(self.t.admin.clone(), &ns).create(&pp, &fixtures::policy("gold")).await?;
        let api = self.servers_api();
        for (i, name) in names.iter().enumerate() {
            let seed = i as u64 + 1;
            let (os, data) = (self.dir.0.join(format!("{name}-os.img")), self.dir.0.join(format!("{name}-data.img")));
            write_pattern(&os, 0, (6 * MIB + 4_321) as usize, seed)?;
            std::fs::File::create(&data)?.set_len(24 * MIB)?;
            write_pattern(&data, 9 * MIB + 7, 100_000, seed + 10)?;
            let mut s = fixtures::server(name);
            s.spec.consistency_group = group.map(str::to_owned);
            s.spec.disks =
                serde_json::from_value(serde_json::json!([{"id": "os", "path": os}, {"id": "data", "path": data}]))?;
            s.spec.failover_target =
                serde_json::from_value(serde_json::json!({"local": {"directory": self.dir.0.join("recovered")}}))?;
            api.create(&pp, &s).await?;
            self.servers
                .push(Protected { name: name.to_string(), disks: vec![("os".into(), os), ("data".into(), data)] });
        }
        for s in &self.servers {
            wait_for(
                &api,
                &s.name,
                Duration::from_secs(90),
                "assignment to the process server",
                |p: &ProtectedServer| p.status.as_ref().and_then(|st| st.process_server.as_deref()) == Some(PS_POD),
            )
            .await?;
        }
        self.port = self.runner.wait_port(PS_POD, 9443, Duration::from_secs(30)).await?;
        for i in 0..self.servers.len() {
            let agent = self.start_agent(i).await?;
            self.agents.push(agent);
        }
        Ok(())
    }

    /// The test namespace.
    pub fn ns(&self) -> &str {
        &self.t.ns.name
    }

    /// The ProtectedServers of the test namespace.
    pub fn servers_api(&self) -> Api<ProtectedServer> {
        Api::namespaced(self.t.admin.clone(), &self.t.ns.name)
    }

    /// Registers the agent of server `i` with its bootstrap token (`siterecovery-agent
    /// register`, as on a real server) and starts it with the written configuration,
    /// pointed at the process server's loopback port.
    pub async fn start_agent(&self, i: usize) -> anyhow::Result<AgentProcess> {
        let s = &self.servers[i];
        let base = self.dir.0.join(format!("agent-{}", s.name));
        let config_path = base.join("agent.json");
        if !config_path.exists() {
            self.register(i, &base).await?;
        }
        let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
        config["processServer"] = format!("localhost:{}", self.port).into();
        config["intervalSeconds"] = 1.0.into();
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config)?)?;
        let log = base.join("agent.log");
        let child = Command::new(binary("siterecovery-agent")?)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?))
            .spawn()?;
        Ok(AgentProcess { child, log })
    }

    async fn register(&self, i: usize, base: &Path) -> anyhow::Result<()> {
        let s = &self.servers[i];
        let secrets: Api<Secret> = Api::namespaced(self.t.admin.clone(), self.ns());
        let plain = wait_for(
            &secrets,
            &format!("sr-bootstrap-{}-token", s.name),
            Duration::from_secs(60),
            "the bootstrap token",
            |_| true,
        )
        .await?;
        let data: BTreeMap<String, Vec<u8>> =
            plain.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
        std::fs::create_dir_all(base)?;
        let ca = base.join("registration-ca.crt");
        std::fs::write(&ca, data.get("ca.crt").context("bootstrap Secret without ca.crt")?)?;
        let token = String::from_utf8(data.get("token").context("bootstrap Secret without token")?.clone())?;
        let mut cmd = Command::new(binary("siterecovery-agent")?);
        cmd.arg("register")
            .arg("--url")
            .arg(format!("https://localhost:{}", self.t.operator.registration_addr.port()))
            .arg("--ca")
            .arg(&ca)
            .args(["--namespace", self.ns(), "--server", &s.name, "--hostname", &format!("{}.example.com", s.name)])
            .arg("--out")
            .arg(base)
            .env("SR_BOOTSTRAP_TOKEN", token);
        for (id, path) in &s.disks {
            cmd.arg("--disk").arg(format!("{id}={}", path.display()));
        }
        let out = cmd.output()?;
        ensure!(
            out.status.success(),
            "siterecovery-agent register failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    /// Waits until the process server reports a crash-consistent point of `server` newer
    /// than `after` (any point when `None`); returns its id.
    pub async fn wait_point(&self, server: &str, after: Option<&str>) -> anyhow::Result<String> {
        let s = wait_for(
            &self.servers_api(),
            server,
            Duration::from_secs(120),
            "a new crash-consistent point in status",
            |p: &ProtectedServer| {
                let id = p
                    .status
                    .as_ref()
                    .and_then(|st| st.latest_recovery_points.as_ref())
                    .and_then(|l| l.crash_consistent.as_ref())
                    .map(|c| c.id.as_str());
                id.is_some() && id > after
            },
        )
        .await?;
        Ok(s.status
            .and_then(|st| st.latest_recovery_points)
            .and_then(|l| l.crash_consistent)
            .map(|c| c.id)
            .unwrap_or_default())
    }

    /// The policy's store, with the key the operator created.
    pub async fn store(&self) -> anyhow::Result<Store> {
        let policy = Api::<ReplicationPolicy>::namespaced(self.t.admin.clone(), self.ns()).get("gold").await?;
        let keys = Api::<Secret>::namespaced(self.t.admin.clone(), self.ns()).get(&policy.key_secret_name()).await?;
        let keyring =
            Keyring::from_secret_data(&keys.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect())?;
        let backend = AzureBlobBackend::with_sas(&fixtures::azurite_endpoint(), "dr-data", &fixtures::azurite_sas())?;
        Ok(Store::new(Arc::new(backend), keyring, StoreOptions::default())?)
    }

    /// Restores point `id` of server `i` into a fresh directory; returns (disk id, path).
    pub async fn restore(&self, i: usize, id: &str) -> anyhow::Result<(Manifest, Vec<(String, PathBuf)>)> {
        let s = &self.servers[i];
        let store = self.store().await?;
        let server = ServerRef::new(self.ns(), &s.name)?;
        let m = store.load_point(&server, id).await?;
        let out = self.dir.0.join(format!("restore-{}-{id}", s.name));
        std::fs::create_dir_all(&out)?;
        let targets: Vec<(String, PathBuf)> = s.disks.iter().map(|(d, _)| (d.clone(), out.join(d))).collect();
        store.restore_point(&server, &m, &targets).await?;
        Ok((m, targets))
    }

    /// Passes `result` through, printing the operator's, process server's and agents' logs
    /// when it is an error.
    pub fn explain<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            eprintln!("--- process server log ---\n{}", self.runner.logs(PS_POD));
            for a in &self.agents {
                eprintln!(
                    "--- agent log {} ---\n{}",
                    a.log.display(),
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                );
            }
        }
        self.t.explain(result)
    }
}

/// Whether two files have the same content.
pub fn same_content(a: &Path, b: &Path) -> anyhow::Result<bool> {
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

/// Sets `op` (with its `runId`) as `spec.operation` of RecoveryPlan `plan` and waits up to
/// 4 minutes until that run succeeded.
pub async fn operate(plans: &Api<RecoveryPlan>, plan: &str, op: serde_json::Value) -> anyhow::Result<()> {
    let run = op["runId"].as_str().unwrap_or_default().to_string();
    let patch = serde_json::json!({"spec": {"operation": op}});
    plans.patch(plan, &PatchParams::default(), &Patch::Merge(&patch)).await?;
    wait_for(plans, plan, Duration::from_secs(240), &format!("run {run} to succeed"), |p: &RecoveryPlan| {
        p.status
            .as_ref()
            .and_then(|s| s.operation.as_ref())
            .is_some_and(|o| o.run_id.as_deref() == Some(run.as_str()) && o.state == RunState::Succeeded)
    })
    .await?;
    Ok(())
}
