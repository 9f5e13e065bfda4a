//! Keeps every ProtectedServer's registration material current: the CA, the agent's
//! client certificate, the namespace's process-server certificate and the bootstrap
//! token. A controller of its own over ProtectedServers (it never lists Secrets, which
//! would need read access to every Secret of the cluster): observe the Secrets by name
//! → decide (pure, `decide.rs`) → write → requeue at the next rotation or expiry.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::ProtectedServer;
use tracing::{info, instrument, warn};

use super::bootstrap;
use super::ca::ensure_ca;
use super::certs::{self, Ca, KeyedCert};
use super::decide::{CaDecision, CertDecision, Wanted, ca_decision, leaf_decision, next_check, renew_at};
use super::error::Error;
use super::{FIELD_MANAGER, PROCESS_SERVER_SERVICE, PROCESS_SERVER_TLS_SECRET, RegistrationConfig};
use crate::context::Context;

const KIND: &str = "AgentRegistration";

struct Shared {
    ctx: Arc<Context>,
    config: RegistrationConfig,
}

/// Runs until `stopped` resolves: issues and rotates certificates and bootstrap tokens
/// for every ProtectedServer in scope. Run it on the leader only (it is a writer).
///
/// Reads the servers from the shared watch in `ctx` and runs only on the changes that
/// concern registration (see [`registration_print`]); agents and process servers report
/// into status all the time, and each reconcile reads four Secrets.
pub async fn run(
    ctx: Arc<Context>,
    config: RegistrationConfig,
    stopped: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let in_scope = config.watch_namespace.clone();
    let trigger = ctx
        .watches
        .servers
        .applied(Some(registration_print))
        .filter(move |s| std::future::ready(in_scope.is_none() || s.namespace() == in_scope));
    let store = ctx.servers.clone();
    let controller_config = ControllerConfig::default().concurrency(config.concurrency);
    let mut stopped = Box::pin(stopped);
    tokio::select! {
        () = ctx.watches.servers.ready() => {}
        () = &mut stopped => return,
    }
    let shared = Arc::new(Shared { ctx, config });
    Controller::for_shared_stream(trigger, store)
        .with_config(controller_config)
        .graceful_shutdown_on(stopped)
        .run(reconcile, error_policy, shared)
        .for_each(|_| async {})
        .await;
}

/// What registration looks at in a server: its spec and deletion, and whether its agent
/// has reported yet (a used token's plaintext is removed then, should the endpoint not
/// have managed to). Not the certificate expiry it records itself: its own write would
/// run it again for nothing (four Secret reads per server); an expiry changed by hand
/// is put right at the next resync.
fn registration_print(server: &ProtectedServer) -> u64 {
    let agent = server.status.as_ref().and_then(|s| s.agent.as_ref());
    crate::watch::fingerprint((
        server.metadata.generation,
        server.metadata.deletion_timestamp.is_some(),
        agent.is_some_and(|a| a.last_heartbeat_time.is_some()),
    ))
}

fn error_policy(_server: Arc<ProtectedServer>, error: &Error, shared: Arc<Shared>) -> Action {
    warn!(error = %error, "agent registration material not reconciled");
    shared.ctx.metrics.reconcile_failed(KIND, error.metric_label());
    error.action()
}

#[instrument(skip_all, fields(server = %server.name_any(), namespace = server.namespace().unwrap_or_default()))]
async fn reconcile(server: Arc<ProtectedServer>, shared: Arc<Shared>) -> Result<Action, Error> {
    let _timer = shared.ctx.metrics.reconcile(KIND);
    if server.metadata.deletion_timestamp.is_some() {
        // Everything below is owned by the server and goes with it.
        return Ok(Action::await_change());
    }
    let (ctx, config) = (&shared.ctx, &shared.config);
    let now = Timestamp::now();
    let ca = ensure_ca(&ctx.client, config, now).await?;
    let ca_next =
        match ca_decision(Some(&ca.info), ca.next_info.as_ref(), config.ca_rotate_before, config.ca_stage_for, now) {
            CaDecision::Keep { until } => Some(until),
            _ => None,
        };
    let client_renew = ensure_client_cert(&server, &ca, ctx, config, now).await?;
    let ps_renew = ensure_process_server_cert(&server.namespace().unwrap_or_default(), &ca, ctx, config, now).await?;
    let token_expiry = ensure_bootstrap(&server, &ca, ctx, config, now).await?;
    let wait = next_check(now, &[ca_next, client_renew, ps_renew, token_expiry], config.resync);
    Ok(Action::requeue(wait))
}

/// What a stored TLS Secret holds, as far as the decision goes.
fn observe(secret: Option<&Secret>, ca: &Ca) -> (Option<Result<certs::CertInfo, ()>>, bool) {
    let data = secret.and_then(|s| s.data.as_ref());
    let cert = secret
        .map(|_| data.and_then(|d| d.get("tls.crt")).ok_or(()).and_then(|c| certs::parse_pem(&c.0).map_err(|_| ())));
    let bundle_current = data.and_then(|d| d.get("ca.crt")).is_some_and(|b| b.0 == ca.bundle_pem.as_bytes());
    (cert, bundle_current)
}

/// The agent's client certificate; returns when it is due for renewal.
async fn ensure_client_cert(
    server: &ProtectedServer,
    ca: &Ca,
    ctx: &Context,
    config: &RegistrationConfig,
    now: Timestamp,
) -> Result<Option<Timestamp>, Error> {
    let (ns, name) = (server.namespace().unwrap_or_default(), server.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret_name = super::client_tls_secret_name(&name);
    let existing = api.get_opt(&secret_name).await?;
    if let Some(s) = &existing
        && !managed(s)
    {
        warn!(secret = %secret_name, "a Secret not created by the operator has the agent certificate's name; leaving it alone");
        return Ok(None);
    }
    let (cert, bundle_current) = observe(existing.as_ref(), ca);
    let trusted = ca.trusted_subjects();
    let uris = [certs::agent_uri(&ns, &name)];
    let wanted = Wanted { trusted_issuers: &trusted, uris: &uris, dns_names: &[] };
    let (not_after, renew) = match leaf_decision(
        cert.as_ref().map(|c| c.as_ref().map_err(|_| ())),
        bundle_current,
        &wanted,
        now,
    ) {
        CertDecision::Keep { renew_at } => (cert.and_then(Result::ok).map(|c| c.not_after), renew_at),
        CertDecision::UpdateBundle { renew_at } => {
            let mut secret = existing.clone().unwrap_or_default();
            put_bundle(&mut secret, ca);
            replace(&api, secret).await?;
            info!(secret = %secret_name, "trust bundle updated (CA rotation)");
            (cert.and_then(Result::ok).map(|c| c.not_after), renew_at)
        }
        CertDecision::Issue(reason) => {
            let issued = ca.issue_client(&ns, &name, now, config.leaf_validity)?;
            let meta = super::bootstrap::meta(server, secret_name.clone());
            write_tls(&api, existing, meta, &issued, ca).await?;
            let info = certs::parse_pem(issued.cert_pem.as_bytes())?;
            info!(secret = %secret_name, reason = reason.describe(), not_after = %info.not_after, "agent certificate issued");
            let note = format!("{}: {}; valid until {}", secret_name, reason.describe(), info.not_after);
            publish(ctx, server, EventType::Normal, reason.event_reason(), note).await;
            (Some(info.not_after), renew_at(info.not_before, info.not_after))
        }
    };
    if let Some(not_after) = not_after {
        record_expiry(server, not_after, ctx).await?;
    }
    Ok(Some(renew))
}

/// `status.agent.certificateExpiryTime`, under registration's own field manager.
pub(super) async fn record_expiry(server: &ProtectedServer, not_after: Timestamp, ctx: &Context) -> Result<(), Error> {
    let recorded =
        server.status.as_ref().and_then(|s| s.agent.as_ref()).and_then(|a| a.certificate_expiry_time.as_ref());
    if recorded.is_some_and(|t| t.0 == not_after) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "status": {"agent": {"certificateExpiryTime": Time(not_after)}},
    });
    Api::<ProtectedServer>::namespaced(ctx.client.clone(), &server.namespace().unwrap_or_default())
        .patch_status(&server.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await?;
    Ok(())
}

/// The serving certificate of the namespace's process servers.
async fn ensure_process_server_cert(
    ns: &str,
    ca: &Ca,
    ctx: &Context,
    config: &RegistrationConfig,
    now: Timestamp,
) -> Result<Option<Timestamp>, Error> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let existing = api.get_opt(PROCESS_SERVER_TLS_SECRET).await?;
    if let Some(s) = &existing
        && !managed(s)
    {
        // Bring your own: e.g. cert-manager issuing from a CA the agents trust.
        return Ok(None);
    }
    let (cert, bundle_current) = observe(existing.as_ref(), ca);
    let names = certs::process_server_names(ns, PROCESS_SERVER_SERVICE, &config.cluster_domain);
    let trusted = ca.trusted_subjects();
    let wanted = Wanted { trusted_issuers: &trusted, uris: &[], dns_names: &names };
    match leaf_decision(cert.as_ref().map(|c| c.as_ref().map_err(|_| ())), bundle_current, &wanted, now) {
        CertDecision::Keep { renew_at } => Ok(Some(renew_at)),
        CertDecision::UpdateBundle { renew_at } => {
            let mut secret = existing.unwrap_or_default();
            put_bundle(&mut secret, ca);
            replace(&api, secret).await?;
            Ok(Some(renew_at))
        }
        CertDecision::Issue(reason) => {
            let issued = ca.issue_serving(&names, now, config.leaf_validity)?;
            let meta = ObjectMeta {
                name: Some(PROCESS_SERVER_TLS_SECRET.into()),
                namespace: Some(ns.into()),
                labels: Some(
                    [
                        ("app.kubernetes.io/component", "process-server"),
                        ("app.kubernetes.io/managed-by", "siterecovery-operator"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                ),
                ..Default::default()
            };
            write_tls(&api, existing, meta, &issued, ca).await?;
            let info = certs::parse_pem(issued.cert_pem.as_bytes())?;
            info!(namespace = ns, reason = reason.describe(), not_after = %info.not_after, "process-server certificate issued");
            Ok(Some(renew_at(info.not_before, info.not_after)))
        }
    }
}

/// The bootstrap token: issued once, its plaintext removed once used or expired.
/// Returns when the token expires, if it is still waiting to be used.
async fn ensure_bootstrap(
    server: &ProtectedServer,
    ca: &Ca,
    ctx: &Context,
    config: &RegistrationConfig,
    now: Timestamp,
) -> Result<Option<Timestamp>, Error> {
    let (ns, name) = (server.namespace().unwrap_or_default(), server.name_any());
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let token_secret = super::bootstrap_token_secret_name(&name);
    match bootstrap::get_state(&api, &ns, &name).await? {
        None => {
            let state = bootstrap::issue(&api, server, config, &ca.bundle_pem, now).await?;
            info!(expires_at = %state.expires_at, "bootstrap token issued");
            let note = format!(
                "read Secret {token_secret} for the agent's bootstrap token; it works once, until {}",
                state.expires_at
            );
            publish(ctx, server, EventType::Normal, "BootstrapTokenIssued", note).await;
            Ok(Some(state.expires_at))
        }
        Some(stored) if stored.state.used.is_some() => {
            bootstrap::delete_plaintext(&api, &name).await?;
            Ok(None)
        }
        Some(stored) if stored.state.expired(now) => {
            if bootstrap::delete_plaintext(&api, &name).await? {
                let note = format!(
                    "the bootstrap token expired unused at {}; delete Secret {} to issue a new one",
                    stored.state.expires_at,
                    super::bootstrap_secret_name(&name)
                );
                publish(ctx, server, EventType::Warning, "BootstrapTokenExpired", note).await;
            }
            Ok(None)
        }
        Some(stored) => Ok(Some(stored.state.expires_at)),
    }
}

pub(super) fn managed(secret: &Secret) -> bool {
    secret.labels().get("app.kubernetes.io/managed-by").is_some_and(|v| v == "siterecovery-operator")
}

fn put_bundle(secret: &mut Secret, ca: &Ca) {
    secret.data.get_or_insert_default().insert("ca.crt".into(), ByteString(ca.bundle_pem.clone().into_bytes()));
}

/// Creates the TLS Secret, or replaces the one read (compare-and-swap on its version).
async fn write_tls(
    api: &Api<Secret>,
    existing: Option<Secret>,
    meta: ObjectMeta,
    cert: &KeyedCert,
    ca: &Ca,
) -> Result<(), Error> {
    let data = [("tls.crt", &cert.cert_pem), ("tls.key", &cert.key_pem), ("ca.crt", &ca.bundle_pem)]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), ByteString(v.clone().into_bytes())))
        .collect();
    match existing {
        None => {
            let secret = Secret {
                metadata: meta,
                type_: Some("kubernetes.io/tls".into()),
                data: Some(data),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &secret).await {
                // A concurrent reconcile (several servers share the process-server
                // Secret) created it first; its certificate is as good as ours.
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                other => {
                    other?;
                }
            }
        }
        Some(mut secret) => {
            secret.data = Some(data);
            replace(api, secret).await?;
        }
    }
    Ok(())
}

async fn replace(api: &Api<Secret>, mut secret: Secret) -> Result<(), Error> {
    secret.metadata.managed_fields = None;
    api.replace(&secret.name_any(), &PostParams::default(), &secret).await?;
    Ok(())
}

/// Publishes an event on the server; a failure is logged, never fatal. Notes never carry
/// a token or key.
pub(super) async fn publish(ctx: &Context, server: &ProtectedServer, type_: EventType, reason: &str, note: String) {
    publish_as(ctx, server, "Register", type_, reason, note).await;
}

/// [`publish`] with another event action (`Renew`).
pub(super) async fn publish_as(
    ctx: &Context,
    server: &ProtectedServer,
    action: &str,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = KubeEvent { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&event, &server.object_ref(&())).await {
        warn!(error = %e, "could not publish event");
    }
}
