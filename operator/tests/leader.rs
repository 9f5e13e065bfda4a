//! Leader election against the real local API server: one leader at a time, a clean
//! hand-over on release, a takeover once a silent holder's lease expires, and a holder
//! that notices when another identity took its lease.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, PostParams};
use siterecovery_e2e::{TestNamespace, client};
use siterecovery_operator::leader::{LeaderElectionConfig, LeaderElector, LeaderError, LeaderGuard};
use tokio::task::JoinHandle;
use tokio::time::timeout;

const LEASE: &str = "siterecovery-operator";
const LEASE_DURATION: Duration = Duration::from_secs(2);
/// Far longer than any hand-over needs, so a slow machine does not fail the test.
const PATIENCE: Duration = Duration::from_secs(20);

fn elector(client: &kube::Client, namespace: &str, identity: &str) -> LeaderElector {
    LeaderElector::new(
        client.clone(),
        LeaderElectionConfig {
            namespace: namespace.to_owned(),
            lease_name: LEASE.to_owned(),
            identity: identity.to_owned(),
            lease_duration: LEASE_DURATION,
            renew_interval: Duration::from_millis(500),
        },
    )
}

fn spawn_acquire(elector: LeaderElector) -> JoinHandle<Result<LeaderGuard, LeaderError>> {
    tokio::spawn(async move { elector.acquire().await })
}

async fn acquired(handle: JoinHandle<Result<LeaderGuard, LeaderError>>) -> LeaderGuard {
    timeout(PATIENCE, handle).await.expect("acquired in time").expect("acquire task").expect("acquire")
}

/// (holderIdentity, leaseTransitions) of the Lease.
async fn holder(leases: &Api<Lease>) -> (Option<String>, i32) {
    let spec = leases.get(LEASE).await.expect("reading the Lease").spec.unwrap_or_default();
    (spec.holder_identity, spec.lease_transitions.unwrap_or(0))
}

#[tokio::test]
async fn one_candidate_leads_and_the_other_takes_over_on_release() {
    let client = client().await.expect("local control plane");
    let ns = TestNamespace::create(&client, "leader").await.expect("namespace");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);

    let mut a = spawn_acquire(elector(&client, &ns.name, "a"));
    let mut b = spawn_acquire(elector(&client, &ns.name, "b"));
    let (winner, loser, waiting) = tokio::select! {
        guard = &mut a => (guard.expect("task").expect("acquire"), "b", b),
        guard = &mut b => (guard.expect("task").expect("acquire"), "a", a),
    };
    let winner_name = if loser == "a" { "b" } else { "a" };

    // Longer than a lease lasts: the winner keeps renewing, so the loser keeps waiting.
    tokio::time::sleep(LEASE_DURATION + Duration::from_secs(1)).await;
    assert!(!waiting.is_finished(), "{loser} acquired a lease {winner_name} holds");
    assert_eq!(holder(&leases).await, (Some(winner_name.to_owned()), 0));

    winner.release().await.expect("release");
    let successor = acquired(waiting).await;
    assert_eq!(holder(&leases).await, (Some(loser.to_owned()), 1));
    successor.release().await.expect("release");
    assert_eq!(holder(&leases).await.0, None, "a released lease has no holder");
}

#[tokio::test]
async fn a_holder_that_stops_renewing_loses_to_a_waiting_candidate() {
    let client = client().await.expect("local control plane");
    let ns = TestNamespace::create(&client, "leader").await.expect("namespace");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);

    let silent = acquired(spawn_acquire(elector(&client, &ns.name, "silent"))).await;
    let waiting = spawn_acquire(elector(&client, &ns.name, "waiting"));
    // A holder whose task is gone: dropping the guard stops renewal without a release.
    drop(silent);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the lease was taken before it expired");

    let successor = acquired(waiting).await;
    assert_eq!(holder(&leases).await, (Some("waiting".to_owned()), 1));
    drop(successor);
}

#[tokio::test]
async fn a_holder_learns_when_another_identity_took_its_lease() {
    let client = client().await.expect("local control plane");
    let ns = TestNamespace::create(&client, "leader").await.expect("namespace");
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);

    let guard = acquired(spawn_acquire(elector(&client, &ns.name, "deposed"))).await;
    // Take the lease by force, as an operator with kubectl would; retry when the holder's
    // renewal slips in between the read and the write.
    loop {
        let mut lease = leases.get(LEASE).await.expect("reading the Lease");
        let spec = lease.spec.as_mut().expect("a Lease with a spec");
        spec.holder_identity = Some("usurper".to_owned());
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        match leases.replace(LEASE, &PostParams::default(), &lease).await {
            Ok(_) => break,
            Err(kube::Error::Api(status)) if status.is_conflict() => continue,
            Err(e) => panic!("replacing the Lease: {e}"),
        }
    }

    timeout(PATIENCE, guard.lost()).await.expect("lost() resolves once another identity holds the lease");
    guard.release().await.expect("releasing a lost lease is a no-op");
    assert_eq!(holder(&leases).await.0.as_deref(), Some("usurper"), "release must not clear another's lease");
}

#[tokio::test]
async fn acquiring_in_a_missing_namespace_fails_instead_of_waiting_forever() {
    let client = client().await.expect("local control plane");
    let elector = elector(&client, "sr-leader-no-such-namespace", "a");
    let error = timeout(PATIENCE, elector.acquire()).await.expect("acquire returns").err().expect("an error");
    let message = error.to_string();
    assert!(message.contains("sr-leader-no-such-namespace/siterecovery-operator"), "{message}");
    assert!(matches!(error, LeaderError::Api { action: "create", .. }), "{error:?}");
}
