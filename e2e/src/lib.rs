//! Harness for tests against the real local control plane (`make cluster-up`).
//!
//! Tests read `KUBECONFIG` (set by `make test`), install the generated CRDs from
//! `crds/`, and each work in a namespace of their own that is deleted afterwards, so
//! test binaries and the tests inside them can run in parallel.

pub mod entra;
pub mod fixtures;
pub mod lifecycle;
pub mod operator;
pub mod pods;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, ResourceExt};
use serde::Deserialize as _;

/// Field manager the harness applies with.
pub const FIELD_MANAGER: &str = "siterecovery-e2e";

/// Root of the repository.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("e2e/ has a parent").to_path_buf()
}

/// A client for the local control plane, with a clear error when it is not running.
pub async fn client() -> anyhow::Result<Client> {
    ensure!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: these tests need the local control plane; run `make test` \
         (or `make cluster-up && source target/cluster/env.sh`)"
    );
    let client = Client::try_default().await.context("building a client from KUBECONFIG")?;
    client.apiserver_version().await.context("the API server in KUBECONFIG does not answer")?;
    Ok(client)
}

/// The kubectl binary: `$KUBECTL`, else the one on `PATH`.
pub fn kubectl_path() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// Runs kubectl with `args`, feeding `stdin`; returns stdout, or an error with stderr.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write;
    let mut cmd = Command::new(kubectl_path());
    cmd.args(args)
        .stdin(if stdin.is_some() { std::process::Stdio::piped() } else { std::process::Stdio::null() })
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {}", kubectl_path()))?;
    if let Some(input) = stdin {
        child.stdin.take().expect("piped").write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("kubectl {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Server-side applies every CRD YAML in `crds/` and waits until each is Established.
pub async fn install_crds(client: &Client) -> anyhow::Result<Vec<CustomResourceDefinition>> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut installed = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("crds"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let crd: CustomResourceDefinition = serde_yaml::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let name = crd.name_any();
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch(&name, &params, &Patch::Apply(&crd)).await.with_context(|| format!("applying {}", path.display()))?;
        installed.push(crd);
    }
    for crd in &installed {
        let name = crd.name_any();
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("CRD {name} not Established within 60s"))??;
    }
    // Established CRDs can take a moment more to appear in discovery (kubectl explain).
    wait_for_discovery(client).await?;
    Ok(installed)
}

/// Waits until the group is in discovery and its kinds are in the published OpenAPI v3
/// document (what `kubectl explain` reads); both lag a little behind `Established`.
async fn wait_for_discovery(client: &Client) -> anyhow::Result<()> {
    let group_version = format!("{}/{}", siterecovery_api::GROUP, siterecovery_api::VERSION);
    let kinds: Vec<String> = siterecovery_api::crds().iter().map(|c| c.spec.names.kind.clone()).collect();
    for _ in 0..300 {
        let discovered = client
            .list_api_group_resources(&group_version)
            .await
            .is_ok_and(|list| kinds.iter().all(|k| list.resources.iter().any(|r| &r.kind == k)));
        if discovered {
            let request = http::Request::get(format!("/openapi/v3/apis/{group_version}")).body(Vec::new())?;
            if let Ok(doc) = client.request_text(request).await
                && kinds.iter().all(|k| doc.contains(&format!("io.siterecovery.v1alpha1.{k}")))
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the {group_version} kinds did not appear in discovery and OpenAPI v3 within 30s")
}

/// A namespace that exists for one test and is deleted when dropped.
pub struct TestNamespace {
    /// Its name.
    pub name: String,
    client: Client,
}

impl TestNamespace {
    /// Creates `sr-<prefix>-<random>`.
    pub async fn create(client: &Client, prefix: &str) -> anyhow::Result<Self> {
        let suffix: String = format!("{:08x}", rand_u32());
        let name = format!("sr-{prefix}-{suffix}");
        let api: Api<Namespace> = Api::all(client.clone());
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"siterecovery.io/e2e": "true"}}
        }))?;
        api.create(&PostParams::default(), &ns).await.with_context(|| format!("creating namespace {name}"))?;
        Ok(Self { name, client: client.clone() })
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let name = self.name.clone();
        // Best effort and non-blocking: the namespace controller finishes the deletion.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = api.delete(&name, &DeleteParams::background()).await;
            });
        }
    }
}

pub(crate) fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() as u32
}

/// Every document of every YAML file in `examples/`, with the file it came from.
pub fn example_documents() -> anyhow::Result<Vec<(PathBuf, serde_json::Value)>> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("examples"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for path in files {
        let text = std::fs::read_to_string(&path)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
            if !value.is_null() {
                out.push((path.clone(), value));
            }
        }
    }
    Ok(out)
}

/// The first example document of `kind`.
pub fn example(kind: &str) -> anyhow::Result<serde_json::Value> {
    example_documents()?
        .into_iter()
        .map(|(_, v)| v)
        .find(|v| v["kind"] == kind)
        .with_context(|| format!("no {kind} in examples/"))
}

/// Polls `get` every 200 ms until `done` holds for the object, or fails after `timeout`
/// with the last state seen (so a failing test says what it was waiting on).
pub async fn wait_for<K, F>(api: &Api<K>, name: &str, timeout: Duration, what: &str, done: F) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(&K) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(obj) = api.get_opt(name).await? {
            if done(&obj) {
                return Ok(obj);
            }
            last = Some(obj);
        }
        if tokio::time::Instant::now() > deadline {
            let seen = last.map(|o| serde_json::to_string_pretty(&o).unwrap_or_default()).unwrap_or("nothing".into());
            bail!("timed out after {timeout:?} waiting for {name}: {what}; last seen:\n{seen}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls until `name` no longer exists.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while api.get_opt(name).await?.is_some() {
        if tokio::time::Instant::now() > deadline {
            bail!("{name} still exists after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// A stop signal for components run in-process by a test (shaped like the operator's
/// own shutdown signal); every future from [`StopSignal::signal`] resolves when it is
/// dropped.
pub struct StopSignal(tokio::sync::watch::Sender<bool>);

impl StopSignal {
    /// A signal not yet given.
    pub fn new() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }

    /// A future that resolves once the signal is given (or the signal dropped).
    pub fn signal(&self) -> impl std::future::Future<Output = ()> + Send + Sync + 'static {
        let mut rx = self.0.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

impl Default for StopSignal {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for StopSignal {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}
