//! The production token path to Blob storage, for real: Azurite over HTTPS with
//! `--oauth basic` and a loopback HTTPS stand-in for Entra ID's token endpoint that checks
//! the client-credentials grant, the scope, and the client assertion (workload identity)
//! or client secret (service principal) — see `siterecovery_e2e::entra`. So the
//! `azure_identity` credentials, the SDK's bearer policy and our connector are what run.
//! The test CA is an explicit extra root of this client only.
//!
//! Starts its own Azurite through `hack/azurite.sh` (installed from npm when missing).

mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use siterecovery_e2e::entra::{CLIENT_SECRET, OauthStorage, service_principal, workload_identity};
use siterecovery_store::backend::{AzureConnector, AzureEnvironment, BlobAuth};
use siterecovery_store::{AzureBlobBackend, BlobBackend, ServerRef};

/// The world of one test.
struct World(OauthStorage);

impl World {
    async fn new() -> Self {
        Self(OauthStorage::start().await.expect("HTTPS Azurite and the Entra stand-in start"))
    }

    /// A connector as a process-server pod has it: the webhook's variables and the test
    /// CA as its one extra root.
    fn connector(&self) -> AzureConnector {
        self.0.connector()
    }

    fn backend(&self, connector: &AzureConnector, container: &str, auth: &BlobAuth) -> AzureBlobBackend {
        connector.backend(&self.0.azurite.endpoint(), container, auth).unwrap()
    }
}

impl std::ops::Deref for World {
    type Target = OauthStorage;
    fn deref(&self) -> &OauthStorage {
        &self.0
    }
}

/// Writes two recovery points through `backend` and restores the second bit-exact.
async fn points_round_trip(backend: Arc<dyn BlobBackend>, dir: &Path) {
    let server = ServerRef::new("dr", "web-1").unwrap();
    let src = dir.join("sda.img");
    let size = 3 * 1024 * 1024 + 5;
    make_image(&src, size, &[(0, 1 << 20, 21), (size - 700, 700, 22)]);
    let store = store(backend, keyring("k1", &["k1"]), 512 * 1024);
    let first = store.write_point(&server, crash_point(0), &[disk("sda", &src)]).await.unwrap();
    assert!(first.chunks_uploaded >= 2, "{first:?}");
    scribble(&src, 2 << 20, 4096, 23);
    store.write_point(&server, crash_point(5), &[disk("sda", &src)]).await.unwrap();
    let points = store.list_points(&server).await.unwrap();
    assert_eq!(points.len(), 2, "both manifests are listed back");
    let out = dir.join("restored.img");
    store.restore_disk(&server, &points[1], "sda", &out).await.unwrap();
    assert_eq!(file_hash(&out), file_hash(&src), "restore is bit-exact");
}

#[tokio::test]
async fn workload_identity_exchanges_the_projected_token_and_reads_and_writes_points() {
    let w = World::new().await;
    let connector = w.connector();
    let backend = Arc::new(w.backend(&connector, "wi-points", &workload_identity()));
    backend.ensure_container().await.unwrap();
    points_round_trip(backend.clone(), &w.dir.0).await;
    {
        let s = w.entra.state();
        assert_eq!(s.refused, Vec::<String>::new());
        assert_eq!(s.issued.get("assertion"), Some(&1), "one token, cached by the SDK for every request");
    }
    // A backend built again for the same identity (the process server re-reads its policy
    // every minute) reuses the credential and its token.
    let again = w.backend(&connector, "wi-points", &workload_identity());
    assert!(again.exists("nothing-here").await.is_ok());
    assert_eq!(w.entra.state().issued.get("assertion"), Some(&1));

    // A token inside its last five minutes is refreshed before each use, not used to expiry.
    w.entra.state().expires_in = 120;
    let short = w.connector();
    let b = w.backend(&short, "wi-points", &workload_identity());
    for i in 0..3 {
        b.put(&format!("refresh/{i}"), Bytes::from_static(b"x")).await.unwrap();
    }
    // One token before, then at least one per request: each was inside its refresh window.
    assert!(w.entra.state().issued["assertion"] > 3, "a token about to expire is replaced before use");
}

#[tokio::test]
async fn a_service_principal_secret_gets_a_token_and_reads_and_writes_points() {
    let w = World::new().await;
    let connector = w.connector();
    let backend = Arc::new(w.backend(&connector, "sp-points", &service_principal(CLIENT_SECRET)));
    backend.ensure_container().await.unwrap();
    points_round_trip(backend, &w.dir.0).await;
    assert_eq!(w.entra.state().issued.get("secret"), Some(&1));
}

#[tokio::test]
async fn refused_expired_or_misaddressed_tokens_fail_with_the_reason_and_no_retry() {
    let w = World::new().await;
    let connector = w.connector();
    w.backend(&connector, "refusals", &service_principal(CLIENT_SECRET)).ensure_container().await.unwrap();

    let wrong = w.backend(&connector, "refusals", &service_principal("not-the-secret"));
    let err = wrong.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    eprintln!("wrong client secret: {err}");
    assert!(err.to_string().contains("AADSTS7000215"), "Entra's reason is kept: {err}");
    assert!(!err.is_retryable(), "{err}");

    // The projected token is not what Entra federates with.
    std::fs::write(&w.token_file, "some-other-token").unwrap();
    let err = w.backend(&w.connector(), "refusals", &workload_identity()).get("x").await.unwrap_err();
    eprintln!("wrong projected token: {err}");
    assert!(err.to_string().contains("AADSTS700211"), "{err}");
    assert!(!err.is_retryable(), "{err}");

    // Entra hands out a token that storage finds expired.
    w.entra.state().exp_offset = -60;
    let expired = w.backend(&w.connector(), "refusals", &service_principal(CLIENT_SECRET));
    let err = expired.put("x", Bytes::from_static(b"x")).await.unwrap_err();
    eprintln!("expired token: {err}");
    assert!(
        err.to_string().contains("AuthenticationFailed: Lifetime validation failed. The token is expired."),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");

    // A token for another resource.
    w.entra.state().exp_offset = 3600;
    w.entra.state().audience = "https://management.azure.com".into();
    let other = w.backend(&w.connector(), "refusals", &service_principal(CLIENT_SECRET));
    let err = other.list("").await.unwrap_err();
    eprintln!("token for another audience: {err}");
    assert!(err.to_string().contains("AuthenticationFailed") && err.to_string().contains("audience"), "{err}");
}

#[tokio::test]
async fn the_test_ca_is_trusted_only_where_it_is_given() {
    let w = World::new().await;
    // The same process without the extra root: the emulator's certificate is refused.
    let plain = AzureConnector::new(AzureEnvironment {
        authority_host: Some(w.entra.authority()),
        federated_token_file: Some(w.token_file.clone()),
        extra_roots_pem: None,
    })
    .unwrap();
    let err = w.backend(&plain, "ca-check", &workload_identity()).exists("x").await.unwrap_err();
    eprintln!("without the test CA: {err}");
    let chain = format!("{err:?}");
    assert!(chain.to_lowercase().contains("certificate") || chain.contains("connect"), "{chain}");
    assert_eq!(w.entra.state().issued.len(), 0, "no token was handed to a server it could not verify");
}
