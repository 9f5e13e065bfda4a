//! The two Secrets of a bootstrap token, both owned by the ProtectedServer:
//!
//! - `sr-bootstrap-<server>` (type `siterecovery.io/bootstrap-token-state`): the hash,
//!   expiry and usage — the state registration checks and flips, with optimistic
//!   concurrency, and the object the agent's ServiceAccount token is bound to;
//! - `sr-bootstrap-<server>-token` (type `siterecovery.io/bootstrap-token`): the
//!   plaintext for the admin to hand to the server, with the CA bundle to verify the
//!   endpoint and a ready request body; deleted once used or expired.
//!
//! A new token is issued only when the state Secret is absent: deleting it is how an
//! admin asks for a new token (which also revokes the agent's ServiceAccount token).

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use siterecovery_api::ProtectedServer;

use super::error::Error;
use super::token::{BootstrapState, BootstrapToken, Usage, hash_token};
use super::{BOOTSTRAP_STATE_TYPE, BOOTSTRAP_TOKEN_TYPE, RegistrationConfig};
use super::{bootstrap_secret_name, bootstrap_token_secret_name};
use crate::server::identity::SERVER_LABEL;

/// The state as read, with the Secret it came from (for its `resourceVersion` and UID).
pub struct Stored {
    /// The parsed state.
    pub state: BootstrapState,
    /// The Secret.
    pub secret: Secret,
}

/// Reads the state of `server`'s token; `None` when no token was issued.
pub async fn get_state(api: &Api<Secret>, namespace: &str, server: &str) -> Result<Option<Stored>, Error> {
    let name = bootstrap_secret_name(server);
    let Some(secret) = api.get_opt(&name).await? else { return Ok(None) };
    let state = BootstrapState::from_data(&secret.data.clone().unwrap_or_default())
        .map_err(|problem| Error::CorruptSecret { secret: format!("{namespace}/{name}"), problem })?;
    Ok(Some(Stored { state, secret }))
}

/// Issues a token: the plaintext Secret first, then the state (create-only). Should the
/// second step fail, the next attempt overwrites the plaintext with a fresh token, so a
/// token is never usable without its state nor lost with it. Returns the new state.
pub async fn issue(
    api: &Api<Secret>,
    server: &ProtectedServer,
    config: &RegistrationConfig,
    trust_bundle: &str,
    now: Timestamp,
) -> Result<BootstrapState, Error> {
    let (ns, name) = (server.namespace().unwrap_or_default(), server.name_any());
    let token = BootstrapToken::generate();
    let state = BootstrapState::new(hash_token(&ns, &name, &token), now, config.bootstrap_token_ttl);

    let plaintext = token_secret(server, config, &token, &state, trust_bundle);
    let token_name = bootstrap_token_secret_name(&name);
    match api.get_opt(&token_name).await? {
        None => api.create(&PostParams::default(), &plaintext).await.map(|_| ())?,
        Some(old) => {
            let mut replacement = plaintext;
            replacement.metadata.resource_version = old.metadata.resource_version;
            api.replace(&token_name, &PostParams::default(), &replacement).await.map(|_| ())?
        }
    }
    let secret = Secret {
        metadata: meta(server, bootstrap_secret_name(&name)),
        type_: Some(BOOTSTRAP_STATE_TYPE.into()),
        data: Some(state.to_data()),
        ..Default::default()
    };
    api.create(&PostParams::default(), &secret).await?;
    Ok(state)
}

fn token_secret(
    server: &ProtectedServer,
    config: &RegistrationConfig,
    token: &BootstrapToken,
    state: &BootstrapState,
    trust_bundle: &str,
) -> Secret {
    let (ns, name) = (server.namespace().unwrap_or_default(), server.name_any());
    let request = json!({
        "namespace": ns, "name": name, "token": token.expose(),
        "hostname": server.spec.agent.hostname, "machineId": server.spec.agent.machine_id,
    });
    let mut data = BTreeMap::from([
        ("token".to_owned(), token.expose().to_owned()),
        ("namespace".to_owned(), ns),
        ("server".to_owned(), name.clone()),
        ("expiresAt".to_owned(), state.expires_at.to_string()),
        ("ca.crt".to_owned(), trust_bundle.to_owned()),
        ("request.json".to_owned(), request.to_string()),
    ]);
    if let Some(url) = &config.registration_url {
        data.insert("registrationURL".to_owned(), url.clone());
    }
    Secret {
        metadata: meta(server, bootstrap_token_secret_name(&name)),
        type_: Some(BOOTSTRAP_TOKEN_TYPE.into()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v.into_bytes()))).collect()),
        ..Default::default()
    }
}

/// Marks the token used with the `resourceVersion` it was read at: of concurrent
/// registrations with one token exactly one succeeds. `Ok(false)` when another write
/// came first (re-read and decide again).
pub async fn mark_used(api: &Api<Secret>, stored: &Stored, usage: Usage) -> Result<bool, Error> {
    let mut state = stored.state.clone();
    state.used = Some(usage);
    let mut secret = stored.secret.clone();
    secret.metadata.managed_fields = None;
    secret.data = Some(state.to_data());
    match api.replace(&secret.name_any(), &PostParams::default(), &secret).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the plaintext Secret; `true` when it existed.
pub async fn delete_plaintext(api: &Api<Secret>, server: &str) -> Result<bool, Error> {
    match api.delete(&bootstrap_token_secret_name(server), &DeleteParams::background()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Metadata of a Secret owned by `server`.
pub fn meta(server: &ProtectedServer, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: server.namespace(),
        labels: Some(BTreeMap::from([
            (SERVER_LABEL.to_owned(), server.name_any()),
            ("app.kubernetes.io/component".to_owned(), "agent-registration".to_owned()),
            ("app.kubernetes.io/managed-by".to_owned(), "siterecovery-operator".to_owned()),
        ])),
        owner_references: server.controller_owner_ref(&()).map(|o| vec![o]),
        ..Default::default()
    }
}
