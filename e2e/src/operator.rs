//! Runs the operator binary as a local process with the Helm chart's ServiceAccount
//! and RBAC (rendered by `helm template`), never as admin, so every test also proves
//! the chart grants enough and no more than what the test exercises.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context as _, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, Config};

use crate::{FIELD_MANAGER, repo_root};

/// The helm binary: `$HELM`, else the pinned one in the tool cache, else `helm` on PATH.
pub fn helm_path() -> PathBuf {
    if let Ok(h) = std::env::var("HELM") {
        return h.into();
    }
    let cache = std::env::var("SR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/siterecovery"));
    let pinned = cache.join("bin/helm/helm");
    if pinned.exists() { pinned } else { "helm".into() }
}

/// Renders the chart with `helm template` into its documents.
pub fn render_chart(release: &str, namespace: &str, extra: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let chart = repo_root().join("charts/siterecovery");
    let mut cmd = Command::new(helm_path());
    cmd.args(["template", release, &chart.to_string_lossy(), "--namespace", namespace, "--kube-version", "1.34.4"]);
    cmd.args(extra);
    let out = cmd.output().context("running helm template")?;
    if !out.status.success() {
        bail!("helm template failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Server-side applies rendered documents of the given kinds.
pub async fn apply_documents(client: &Client, docs: &[serde_json::Value], kinds: &[&str]) -> anyhow::Result<()> {
    for doc in docs.iter().filter(|d| kinds.contains(&d["kind"].as_str().unwrap_or_default())) {
        let (group, version) = match doc["apiVersion"].as_str().unwrap_or_default().split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), doc["apiVersion"].as_str().unwrap_or_default().to_owned()),
        };
        let kind = doc["kind"].as_str().unwrap_or_default();
        let gvk = GroupVersionKind::gvk(&group, &version, kind);
        let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
        let name = doc["metadata"]["name"].as_str().context("document without a name")?;
        let api: Api<DynamicObject> = match (caps.scope, doc["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
            _ => Api::all_with(client.clone(), &resource),
        };
        api.patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(doc))
            .await
            .with_context(|| format!("applying {kind} {name}"))?;
    }
    Ok(())
}

/// The RBAC kinds of the chart, installed by the tests instead of a whole release.
const RBAC_KINDS: [&str; 5] = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// Installs the chart's ServiceAccounts and RBAC for a release named after `operator_ns`
/// (so parallel tests do not share ClusterRoles); returns the operator ServiceAccount's name.
pub async fn install_chart_rbac(admin: &Client, operator_ns: &str) -> anyhow::Result<String> {
    let docs = render_chart(operator_ns, operator_ns, &[])?;
    apply_documents(admin, &docs, &RBAC_KINDS).await?;
    Ok(format!("{operator_ns}-operator"))
}

/// A client with exactly the chart's operator permissions (for components run in-process).
pub async fn operator_client(admin: &Client, operator_ns: &str) -> anyhow::Result<Client> {
    let account = install_chart_rbac(admin, operator_ns).await?;
    client_as(admin, operator_ns, &account).await
}

/// A short-lived token for a ServiceAccount (TokenRequest API).
pub async fn service_account_token(client: &Client, namespace: &str, name: &str) -> anyhow::Result<String> {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..Default::default() },
        ..Default::default()
    };
    let response = api.create_token_request(name, &PostParams::default(), &request).await?;
    Ok(response.status.context("TokenRequest without status")?.token)
}

/// A client that authenticates with a ServiceAccount token instead of the admin certificate.
pub async fn client_as(admin: &Client, namespace: &str, service_account: &str) -> anyhow::Result<Client> {
    let token = service_account_token(admin, namespace, service_account).await?;
    let mut config = Config::infer().await?;
    config.auth_info = kube::config::AuthInfo { token: Some(token.into()), ..Default::default() };
    Ok(Client::try_from(config)?)
}

/// A kubeconfig file that authenticates with `token`, for a child process.
pub fn write_token_kubeconfig(dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
    let admin = kube::config::Kubeconfig::read().context("reading KUBECONFIG")?;
    let cluster = admin.clusters.first().and_then(|c| c.cluster.clone()).context("KUBECONFIG has no cluster")?;
    let ca = match (&cluster.certificate_authority, &cluster.certificate_authority_data) {
        (Some(path), _) => format!("certificate-authority: {path}"),
        (None, Some(data)) => format!("certificate-authority-data: {data}"),
        _ => String::new(),
    };
    let server = cluster.server.context("cluster without server")?;
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    {ca}\n\
             users:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: local\n  context: {{cluster: local, user: sa}}\n\
             current-context: local\n"
        ),
    )?;
    Ok(path)
}

/// The operator running as a local process; killed when dropped.
pub struct OperatorProcess {
    child: Child,
    /// Where its logs go.
    pub log: PathBuf,
    /// Its /metrics, /healthz, /readyz address.
    pub metrics_addr: std::net::SocketAddr,
    /// Its agent registration endpoint (HTTPS).
    pub registration_addr: std::net::SocketAddr,
    _dir: TempDir,
}

impl OperatorProcess {
    /// Installs the chart's operator ServiceAccount and RBAC into `operator_ns` (release
    /// named after the namespace, so ClusterRoles of parallel tests do not collide) and
    /// starts `binary` with that identity, watching only `watch_ns`.
    pub async fn start(client: &Client, binary: &Path, operator_ns: &str, watch_ns: &str) -> anyhow::Result<Self> {
        Self::start_with_env(client, binary, operator_ns, watch_ns, &[]).await
    }

    /// As [`Self::start`], with extra environment variables (e.g. what the workload-identity
    /// webhook injects, from [`crate::entra::OauthStorage::pod_env`]).
    pub async fn start_with_env(
        client: &Client,
        binary: &Path,
        operator_ns: &str,
        watch_ns: &str,
        env: &[(String, std::ffi::OsString)],
    ) -> anyhow::Result<Self> {
        let account = install_chart_rbac(client, operator_ns).await?;
        let token = service_account_token(client, operator_ns, &account).await?;
        let dir = TempDir::new("operator")?;
        let kubeconfig = write_token_kubeconfig(&dir.0, &token)?;
        let metrics_addr = free_loopback_port()?;
        let registration_addr = free_loopback_port()?;
        let log = dir.0.join("operator.log");
        let child = Command::new(binary)
            .env("KUBECONFIG", &kubeconfig)
            .env("SR_WATCH_NAMESPACE", watch_ns)
            .env("POD_NAMESPACE", operator_ns)
            .env("POD_NAME", format!("{operator_ns}-operator-0"))
            .env("SR_METRICS_ADDR", metrics_addr.to_string())
            // Parallel tests each run an operator: a free port each for the registration endpoint.
            .env("SR_REGISTRATION_ADDR", registration_addr.to_string())
            // As the chart's Deployment sets it: the process servers' ClusterRole.
            .env("SR_PROCESS_SERVER_CLUSTER_ROLE", format!("{operator_ns}-process-server"))
            .env("SR_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,siterecovery_operator=debug,kube=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::File::options().append(true).open(&log)?))
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self { child, log, metrics_addr, registration_addr, _dir: dir })
    }

    /// The operator's process id (benchmarks read its memory from `/proc/<pid>/status`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The operator's log so far (for assertion messages).
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path of the metrics server; returns (status, body).
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.metrics_addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await?;
        let status = raw.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no HTTP status")?;
        let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Ok((status, body))
    }

    /// Sends SIGTERM and waits for a graceful exit; returns whether it exited 0.
    pub fn terminate(&mut self) -> anyhow::Result<bool> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        // The operator's own grace period is 10 s; allow for a loaded machine.
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.success());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        bail!("operator did not exit within 20s of SIGTERM")
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_loopback_port() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/siterecovery-<prefix>-<random>`.
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("siterecovery-{prefix}-{:08x}", crate::rand_u32()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test's world: the real API server with the CRDs, an operator namespace, a workload
/// namespace, and the operator binary between them as the chart's ServiceAccount.
pub struct OperatorTest {
    /// Admin client for the test's own reads and writes.
    pub admin: Client,
    /// The running operator.
    pub operator: OperatorProcess,
    /// Where the servers, policies and plans go.
    pub ns: crate::TestNamespace,
    /// The operator's own namespace (its Lease, its CA).
    pub op_ns: crate::TestNamespace,
}

impl OperatorTest {
    /// Sets everything up; namespaces are named `sr-op-<prefix>-…` and `sr-<prefix>-…`.
    pub async fn start(binary: &Path, prefix: &str) -> anyhow::Result<Self> {
        Self::start_with_env(binary, prefix, &[]).await
    }

    /// As [`Self::start`], the operator with extra environment variables.
    pub async fn start_with_env(
        binary: &Path,
        prefix: &str,
        env: &[(String, std::ffi::OsString)],
    ) -> anyhow::Result<Self> {
        let admin = crate::client().await?;
        crate::install_crds(&admin).await?;
        let op_ns = crate::TestNamespace::create(&admin, &format!("op-{prefix}")).await?;
        let ns = crate::TestNamespace::create(&admin, prefix).await?;
        let operator = OperatorProcess::start_with_env(&admin, binary, &op_ns.name, &ns.name, env).await?;
        Ok(Self { admin, operator, ns, op_ns })
    }

    /// Passes `result` through, printing the operator's log when it is an error.
    pub fn explain<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            eprintln!("--- operator log ---\n{}", self.operator.logs());
        }
        result
    }
}
