//! Running pods where no kubelet exists: the embedded control plane has no container
//! runtime, so the harness plays the kubelet for the pods the operator's workloads
//! create. For each pod matching a label selector it starts the container's program as
//! a local process, from the pod spec itself:
//!
//! - **program**: the locally built binary named like the image (`…/siterecovery-process-server:tag`
//!   → `<bin dir>/siterecovery-process-server`), with the container's `args`;
//! - **environment**: `value`s, and `fieldRef`s to `metadata.name`, `metadata.namespace`,
//!   `metadata.uid`, `spec.serviceAccountName` and `status.podIP` (127.0.0.1);
//! - **volumes**: a directory per volume under the runner's directory; Secret and ConfigMap
//!   volumes hold their keys as files; emptyDir and claims start empty, and a claim's
//!   directory survives a restart of the pod. Environment values and arguments that start
//!   with a mount path are rewritten to the volume's directory;
//! - **ports**: every declared container port is mapped to a free loopback port, and an
//!   environment value equal to a declared port is rewritten to its mapped port
//!   ([`PodRunner::port`] tells tests where to connect);
//! - **identity**: `KUBECONFIG` with a token of the pod's ServiceAccount (TokenRequest), so
//!   the process has exactly the RBAC its pod would have.
//!
//! The pod's status is then set to Running and Ready (as the kubelet would). A deleted pod
//! has its process killed and its deletion confirmed. Nothing else of the kubelet is imitated (probes, restarts,
//! resource limits, security contexts).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt as _};

use crate::operator::{TempDir, service_account_token, write_token_kubeconfig};

/// A pod's process.
struct Running {
    child: Child,
    uid: String,
    ports: HashMap<u16, u16>,
    log: PathBuf,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct State {
    running: HashMap<String, Running>,
    failures: Vec<String>,
}

/// Runs the pods matching a selector in one namespace until dropped.
pub struct PodRunner {
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
    dir: Arc<TempDir>,
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        self.task.abort();
        self.state.lock().unwrap_or_else(|p| p.into_inner()).running.clear();
        unmount_claims(&self.dir.0);
    }
}

impl PodRunner {
    /// Starts running the pods of `namespace` that match `selector`, with binaries from
    /// `bin_dir` and `extra_env` added to every process.
    pub fn start(
        admin: Client,
        namespace: &str,
        selector: &str,
        bin_dir: PathBuf,
        extra_env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let dir = Arc::new(TempDir::new("pods")?);
        let state = Arc::new(Mutex::new(State::default()));
        let (ns, sel, st, d) = (namespace.to_string(), selector.to_string(), state.clone(), dir.clone());
        let task = tokio::spawn(async move {
            let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
            loop {
                if let Ok(list) = pods.list(&ListParams::default().labels(&sel)).await {
                    reconcile(&admin, &pods, &ns, list.items, &st, &d.0, &bin_dir, &extra_env).await;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(Self { state, task, dir })
    }

    /// Every running pod's port mapping: pod → (container port → loopback port).
    pub fn ports(&self) -> BTreeMap<String, BTreeMap<u16, u16>> {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.running.iter().map(|(k, r)| (k.clone(), r.ports.iter().map(|(a, b)| (*a, *b)).collect())).collect()
    }

    /// Why pods could not be started so far.
    pub fn failures(&self) -> Vec<String> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).failures.clone()
    }

    /// The loopback port a container port of `pod` is mapped to, once it runs.
    pub fn port(&self, pod: &str, container_port: u16) -> Option<u16> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).running.get(pod)?.ports.get(&container_port).copied()
    }

    /// Waits until `pod` runs and returns the loopback port of `container_port`.
    pub async fn wait_port(&self, pod: &str, container_port: u16, timeout: Duration) -> anyhow::Result<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(p) = self.port(pod, container_port) {
                return Ok(p);
            }
            let failures = self.state.lock().unwrap_or_else(|p| p.into_inner()).failures.clone();
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "pod {pod} never ran; failures: {failures:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The log of a pod's process so far.
    pub fn logs(&self, pod: &str) -> String {
        let path = self.state.lock().unwrap_or_else(|p| p.into_inner()).running.get(pod).map(|r| r.log.clone());
        path.and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default()
    }

    /// Kills a pod's process (as a node crash would), leaving its volumes; the runner
    /// starts it again within a second, as the kubelet restarts a container.
    pub fn kill(&self, pod: &str) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).running.remove(pod);
    }

    /// The runner's directory (volumes, logs).
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }
}

#[allow(clippy::too_many_arguments)]
async fn reconcile(
    admin: &Client,
    pods: &Api<Pod>,
    ns: &str,
    list: Vec<Pod>,
    state: &Mutex<State>,
    dir: &Path,
    bin_dir: &Path,
    extra_env: &[(String, String)],
) {
    let live: HashMap<String, String> = list
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.running.retain(|name, r| live.get(name) == Some(&r.uid));
        // A process that exited is started again (restartPolicy Always).
        s.running.retain(|_, r| matches!(r.child.try_wait(), Ok(None)));
    }
    for pod in list {
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            // As the kubelet does once the container stopped: confirm the deletion, or the
            // pod (and its namespace, and a claim's protection) waits forever.
            let dp = kube::api::DeleteParams { grace_period_seconds: Some(0), ..Default::default() };
            let _ = pods.delete(&name, &dp).await;
            continue;
        }
        if state.lock().unwrap_or_else(|p| p.into_inner()).running.contains_key(&name) {
            continue;
        }
        match start_pod(admin, ns, &pod, dir, bin_dir, extra_env).await {
            Ok(r) => {
                let status = serde_json::json!({"status": {
                    "phase": "Running",
                    "podIP": "127.0.0.1",
                    "hostIP": "127.0.0.1",
                    "startTime": jiff::Timestamp::now().to_string(),
                    "conditions": [
                        {"type": "Ready", "status": "True", "lastTransitionTime": jiff::Timestamp::now().to_string()},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": jiff::Timestamp::now().to_string()}
                    ],
                }});
                if let Err(e) = pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await {
                    state.lock().unwrap_or_else(|p| p.into_inner()).failures.push(format!("{name}: status: {e}"));
                }
                state.lock().unwrap_or_else(|p| p.into_inner()).running.insert(name, r);
            }
            Err(e) => state.lock().unwrap_or_else(|p| p.into_inner()).failures.push(format!("{name}: {e:#}")),
        }
    }
}

async fn start_pod(
    admin: &Client,
    ns: &str,
    pod: &Pod,
    dir: &Path,
    bin_dir: &Path,
    extra_env: &[(String, String)],
) -> anyhow::Result<Running> {
    let name = pod.name_any();
    let spec = pod.spec.as_ref().context("pod without spec")?;
    let c = spec.containers.first().context("pod without containers")?;
    let image = c.image.as_deref().context("container without image")?;
    let program = image.rsplit('/').next().unwrap_or(image).split([':', '@']).next().unwrap_or(image);
    let binary = bin_dir.join(program);
    anyhow::ensure!(binary.exists(), "no local binary {} for image {image}", binary.display());

    // Volumes: a directory each; claims keyed by claim name so they outlive the process.
    let pod_dir = dir.join(&name);
    std::fs::create_dir_all(&pod_dir)?;
    let mut volume_dirs: BTreeMap<String, PathBuf> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        let path = match &v.persistent_volume_claim {
            Some(claim) => dir.join("claims").join(&claim.claim_name),
            None => pod_dir.join("volumes").join(&v.name),
        };
        std::fs::create_dir_all(&path)?;
        if let Some(claim) = &v.persistent_volume_claim {
            mount_claim(admin, ns, &claim.claim_name, &path).await?;
        }
        if let Some(s) = &v.secret {
            let secret_name = s.secret_name.as_deref().context("secret volume without name")?;
            let secret = Api::<Secret>::namespaced(admin.clone(), ns)
                .get(secret_name)
                .await
                .with_context(|| format!("Secret {secret_name}"))?;
            for (k, val) in secret.data.unwrap_or_default() {
                std::fs::write(path.join(k), val.0)?;
            }
        }
        if let Some(cm) = &v.config_map {
            let cm = Api::<ConfigMap>::namespaced(admin.clone(), ns).get(&cm.name).await?;
            for (k, val) in cm.data.unwrap_or_default() {
                std::fs::write(path.join(k), val)?;
            }
        }
        volume_dirs.insert(v.name.clone(), path);
    }
    // Claim templates of a StatefulSet: `<template>-<pod>`.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let path = match volume_dirs.get(&m.name) {
            Some(p) => p.clone(),
            None => {
                let p = dir.join("claims").join(format!("{}-{name}", m.name));
                std::fs::create_dir_all(&p)?;
                p
            }
        };
        mounts.push((m.mount_path.clone(), path));
    }
    mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
    let rewrite = |value: &str| -> String {
        for (mount, local) in &mounts {
            if let Some(rest) = value.strip_prefix(mount.as_str()) {
                return format!("{}{rest}", local.display());
            }
        }
        value.to_string()
    };

    let mut ports = HashMap::new();
    for p in c.ports.iter().flatten() {
        let free = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        ports.insert(p.container_port as u16, free);
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for e in c.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            v.clone()
        } else if let Some(f) = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
            match f.field_path.as_str() {
                "metadata.name" => name.clone(),
                "metadata.namespace" => ns.to_string(),
                "metadata.uid" => pod.uid().unwrap_or_default(),
                "spec.serviceAccountName" => spec.service_account_name.clone().unwrap_or_default(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".into(),
                other => anyhow::bail!("env {}: fieldRef {other} is not supported by the pod runner", e.name),
            }
        } else {
            anyhow::bail!("env {}: only values and fieldRefs are supported by the pod runner", e.name)
        };
        let value = remap_port(&value, &ports).unwrap_or_else(|| rewrite(&value));
        env.push((e.name.clone(), value));
    }
    let account = spec.service_account_name.clone().unwrap_or_else(|| "default".into());
    let token = service_account_token(admin, ns, &account)
        .await
        .with_context(|| format!("token of ServiceAccount {account}"))?;
    let kubeconfig = write_token_kubeconfig(&pod_dir, &token)?;
    let args: Vec<String> = c.args.iter().flatten().map(|a| rewrite(a)).collect();
    let log = pod_dir.join("log");
    let child = Command::new(&binary)
        .args(&args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KUBECONFIG", &kubeconfig)
        .envs(env)
        .envs(extra_env.iter().cloned())
        .stdout(Stdio::from(std::fs::File::create(&log)?))
        .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?))
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    Ok(Running { child, uid: pod.uid().unwrap_or_default(), ports, log })
}

/// A declared container port in an environment value, as `9443` or `0.0.0.0:9443`:
/// its mapped loopback port (never another interface: tests stay on loopback).
fn remap_port(value: &str, ports: &HashMap<u16, u16>) -> Option<String> {
    if let Some(mapped) = value.parse::<u16>().ok().and_then(|p| ports.get(&p)) {
        return Some(mapped.to_string());
    }
    let (_, port) = value.rsplit_once(':')?;
    let mapped = ports.get(&port.parse::<u16>().ok()?)?;
    Some(format!("127.0.0.1:{mapped}"))
}

/// A claim is a filesystem of its own, as a real volume is (a process server reports its
/// free space from it): as root, a tmpfs of the claim's requested size, mounted once and
/// kept until the runner's directory goes; otherwise a plain directory.
async fn mount_claim(admin: &Client, ns: &str, claim: &str, path: &Path) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::PersistentVolumeClaim;
    let is_root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let mounted = std::fs::read_to_string("/proc/self/mounts")
        .is_ok_and(|m| m.lines().any(|l| l.split_whitespace().nth(1) == path.to_str()));
    if !is_root || mounted {
        return Ok(());
    }
    let pvc = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns).get_opt(claim).await?;
    let size = pvc
        .and_then(|c| c.spec)
        .and_then(|s| s.resources)
        .and_then(|r| r.requests)
        .and_then(|r| r.get("storage").map(|q| q.0.clone()))
        .unwrap_or_else(|| "1Gi".into());
    // tmpfs understands k/m/g (binary); Kubernetes quantities say Ki/Mi/Gi/Ti.
    let size = match size.strip_suffix("Ti") {
        Some(t) => format!("{}g", t.parse::<u64>().unwrap_or(1) * 1024),
        None => size.replace("Gi", "g").replace("Mi", "m").replace("Ki", "k"),
    };
    let status =
        Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(path).status()?;
    anyhow::ensure!(status.success(), "mounting a tmpfs for claim {claim} at {}", path.display());
    Ok(())
}

/// Unmounts the claims under `dir` (called when the runner goes).
fn unmount_claims(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return };
    let prefix = dir.join("claims");
    for l in mounts.lines() {
        if let Some(m) = l.split_whitespace().nth(1)
            && Path::new(m).starts_with(&prefix)
        {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Where `cargo build` put the workspace's binaries: the directory of the running
/// executable (a test binary sits one level deeper, in `deps/`), so a custom
/// `CARGO_TARGET_DIR` works too.
pub fn bin_dir() -> PathBuf {
    let fallback = || crate::repo_root().join("target").join(if cfg!(debug_assertions) { "debug" } else { "release" });
    let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) else {
        return fallback();
    };
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or_else(fallback)
    } else {
        dir
    }
}
