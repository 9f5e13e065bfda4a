//! Connecting like kubectl (`--kubeconfig`, `--context`, `-n`), and API errors turned
//! into messages that say what to do.

use anyhow::{Context as _, anyhow};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::args::Global;

/// A client and the namespace commands work in.
#[derive(Clone)]
pub struct Kube {
    /// Client for the chosen context.
    pub client: Client,
    /// `-n`, else the context's namespace, else `default`.
    pub namespace: String,
}

impl Kube {
    /// Connects as kubectl would: explicit kubeconfig and context when given, else
    /// `$KUBECONFIG`/`~/.kube/config`, else the in-cluster service account.
    pub async fn connect(global: &Global) -> anyhow::Result<Self> {
        let options = KubeConfigOptions { context: global.context.clone(), ..Default::default() };
        let config = if let Some(path) = &global.kubeconfig {
            let file = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(file, &options).await.with_context(|| context_hint(global))?
        } else if global.context.is_some() {
            Config::from_kubeconfig(&options).await.with_context(|| context_hint(global))?
        } else {
            Config::infer().await.context(
                "no Kubernetes configuration found: set KUBECONFIG, pass --kubeconfig, or run inside a cluster",
            )?
        };
        let namespace = global.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let client = Client::try_from(config).context("building the Kubernetes client")?;
        Ok(Self { client, namespace })
    }
}

fn context_hint(global: &Global) -> String {
    match &global.context {
        Some(c) => format!("loading context {c:?} from the kubeconfig (kubectl config get-contexts lists them)"),
        None => "loading the kubeconfig".into(),
    }
}

/// HTTP status of an API error, if it is one.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Explains an API error on `what` (e.g. `RecoveryPlan drill`) in namespace `ns`.
pub fn explain(e: kube::Error, verb: &str, what: &str, ns: &str) -> anyhow::Error {
    match status_code(&e) {
        Some(404) => anyhow!("{what} not found in namespace {ns} (kubectl get siterecovery -n {ns} lists what exists)"),
        Some(403) => anyhow!(
            "not allowed to {verb} {what} in namespace {ns}: ask for RBAC that grants it \
             (kubectl auth can-i {verb} {} -n {ns})",
            resource_of(what)
        ),
        Some(409) => anyhow!("{what} changed while this command was editing it; run the command again"),
        Some(422) | Some(400) => {
            let msg = match &e {
                kube::Error::Api(s) => s.message.clone(),
                _ => e.to_string(),
            };
            anyhow!("the API server refused the change to {what}: {msg}")
        }
        _ => anyhow!(e).context(format!("could not {verb} {what} in namespace {ns}")),
    }
}

/// `RecoveryPlan drill` → `recoveryplans.siterecovery.io`, for `kubectl auth can-i`.
fn resource_of(what: &str) -> String {
    let kind = what.split_whitespace().next().unwrap_or(what);
    match kind {
        "Secret" => "secrets".into(),
        "ReplicationPolicy" => "replicationpolicies.siterecovery.io".into(),
        k => format!("{}s.{}", k.to_lowercase(), siterecovery_api::GROUP),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure(message, "Reason").with_code(code).boxed())
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = explain(api_error(404, "nope"), "get", "RecoveryPlan drill", "prod").to_string();
        assert_eq!(
            e,
            "RecoveryPlan drill not found in namespace prod (kubectl get siterecovery -n prod lists what exists)"
        );
        let e = explain(api_error(403, "forbidden"), "get", "Secret storage", "prod").to_string();
        assert!(e.contains("kubectl auth can-i get secrets -n prod"), "{e}");
        let e = explain(api_error(403, "forbidden"), "patch", "RecoveryPlan drill", "prod").to_string();
        assert!(e.contains("kubectl auth can-i patch recoveryplans.siterecovery.io -n prod"), "{e}");
        let e =
            explain(api_error(422, "spec.operation.recoveryPoint: bad"), "patch", "RecoveryPlan d", "p").to_string();
        assert_eq!(e, "the API server refused the change to RecoveryPlan d: spec.operation.recoveryPoint: bad");
    }
}
