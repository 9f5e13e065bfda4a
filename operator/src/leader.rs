//! Leader election over a coordination.k8s.io/v1 Lease, so that only one operator
//! replica reconciles at a time while the others wait as hot standbys.
//!
//! kube-runtime 5 ships no leader election, so this module implements the algorithm of
//! client-go's `leaderelection` package directly (kube-lease-manager 0.13 also supports
//! kube 5 and could replace this module should it need more than acquire/renew/release):
//!
//! - a candidate reads the Lease and claims it when it is missing, released (empty
//!   `holderIdentity`) or expired (`renewTime + leaseDurationSeconds < now`);
//! - every write is a create or a replace carrying the `resourceVersion` that was read,
//!   so when two candidates race the API server accepts one write and rejects the other
//!   with 409 Conflict: two candidates can never both win;
//! - the holder renews every `renew_interval` and considers the lease lost once it has
//!   not renewed for `lease_duration` (the moment a candidate may take it over) or once
//!   it sees another holder;
//! - releasing empties `holderIdentity` so that a waiting candidate takes over at its
//!   next poll instead of waiting for the lease to expire.
//!
//! Expiry compares the holder's `renewTime` with the candidate's clock, so node clocks
//! must agree to well within `lease_duration - renew_interval` (NTP does).

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where the Lease lives, who we are, and how long a lease lasts.
#[derive(Clone, Debug)]
pub struct LeaderElectionConfig {
    /// Namespace of the Lease (usually the operator's own).
    pub namespace: String,
    /// Name of the Lease every replica competes for.
    pub lease_name: String,
    /// This replica's identity, written to `holderIdentity` (usually the pod name).
    pub identity: String,
    /// How long a lease stays valid after its last renewal; rounded up to whole seconds.
    pub lease_duration: Duration,
    /// How often the holder renews and a candidate retries; well below `lease_duration`.
    pub renew_interval: Duration,
}

/// Why electing or releasing failed.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The configuration cannot work; fix it, retrying will not help.
    #[error("invalid leader election config: {0}")]
    Config(&'static str),
    /// The API server refused a request in a way retrying will not fix (RBAC, missing
    /// namespace, invalid object), or failed while releasing.
    #[error("cannot {action} Lease {lease}: {source}")]
    Api {
        /// What we were doing: "read", "create", "update".
        action: &'static str,
        /// `namespace/name` of the Lease.
        lease: String,
        /// The client error.
        #[source]
        source: kube::Error,
    },
}

/// Competes for one Lease on behalf of this process.
#[derive(Clone)]
pub struct LeaderElector {
    leases: Api<Lease>,
    config: LeaderElectionConfig,
}

/// Proof of leadership: while it lives a background task renews the lease. Dropping it
/// stops renewing without releasing, so a successor takes over once the lease expires.
pub struct LeaderGuard {
    elector: LeaderElector,
    lost: watch::Receiver<bool>,
    renewer: JoinHandle<()>,
}

/// What one read-then-write round against the Lease achieved.
#[derive(Debug)]
enum Attempt {
    /// We created the Lease or took it over.
    Claimed,
    /// We already held the lease and renewed it.
    Renewed,
    /// Another identity holds a lease that has not expired.
    HeldBy(String),
    /// Someone wrote the Lease between our read and our write; read again.
    Raced,
}

/// What a candidate should do with a Lease it has read; pure, see [`decide`].
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// It is ours: renew it.
    Renew,
    /// It is free, released or expired: claim it, counting a transition.
    TakeOver {
        /// The holder being replaced, if any.
        previous: Option<String>,
    },
    /// Another identity holds a live lease.
    Wait {
        /// That identity.
        holder: String,
    },
}

impl LeaderElectionConfig {
    fn validate(&self) -> Result<(), LeaderError> {
        if self.namespace.is_empty() || self.lease_name.is_empty() {
            return Err(LeaderError::Config("namespace and lease_name must not be empty"));
        }
        if self.identity.is_empty() {
            return Err(LeaderError::Config("identity must not be empty"));
        }
        if self.lease_duration < Duration::from_secs(1) {
            return Err(LeaderError::Config("lease_duration must be at least one second"));
        }
        if self.renew_interval.is_zero() || self.renew_interval >= self.lease_duration {
            return Err(LeaderError::Config("renew_interval must be positive and shorter than lease_duration"));
        }
        Ok(())
    }

    /// `leaseDurationSeconds`: the configured duration rounded up to whole seconds, so a
    /// candidate never takes over earlier than the holder gives up.
    fn lease_duration_seconds(&self) -> i32 {
        let d = self.lease_duration;
        i32::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i32::MAX)
    }
}

impl LeaderElector {
    /// An elector for `config.namespace/config.lease_name`; nothing is contacted yet.
    pub fn new(client: kube::Client, config: LeaderElectionConfig) -> Self {
        Self { leases: Api::namespaced(client, &config.namespace), config }
    }

    /// Blocks until this process holds the lease, then keeps renewing it in a background
    /// task. Transient API errors are retried; errors retrying cannot fix are returned.
    pub async fn acquire(&self) -> Result<LeaderGuard, LeaderError> {
        self.config.validate()?;
        let mut observed_holder: Option<String> = None;
        loop {
            let started = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(attempt @ (Attempt::Claimed | Attempt::Renewed)) => {
                    if matches!(attempt, Attempt::Renewed) {
                        let identity = &self.config.identity;
                        tracing::info!(lease = %self.lease(), %identity, "already held the lease; leading again");
                    }
                    let (lost_tx, lost) = watch::channel(false);
                    let renewer = tokio::spawn(self.clone().renew(started, lost_tx));
                    return Ok(LeaderGuard { elector: self.clone(), lost, renewer });
                }
                Ok(Attempt::HeldBy(holder)) => {
                    if observed_holder.as_ref() != Some(&holder) {
                        tracing::info!(lease = %self.lease(), %holder, "lease is held by another replica; waiting");
                        observed_holder = Some(holder);
                    }
                }
                Ok(Attempt::Raced) => tracing::debug!(lease = %self.lease(), "lost a race for the lease; retrying"),
                Err(error) if is_permanent(&error) => return Err(error),
                Err(error) => {
                    tracing::warn!(lease = %self.lease(), error = %error, "acquiring the lease failed; retrying")
                }
            }
            tokio::time::sleep(self.config.renew_interval).await;
        }
    }

    fn lease(&self) -> String {
        format!("{}/{}", self.config.namespace, self.config.lease_name)
    }

    fn api_error(&self, action: &'static str, source: kube::Error) -> LeaderError {
        LeaderError::Api { action, lease: self.lease(), source }
    }

    /// One round of client-go's `tryAcquireOrRenew`: read, decide, write with the read
    /// `resourceVersion`.
    async fn try_acquire_or_renew(&self) -> Result<Attempt, LeaderError> {
        let now = Timestamp::now();
        let identity = &self.config.identity;
        let current = self.leases.get_opt(&self.config.lease_name).await.map_err(|e| self.api_error("read", e))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.lease_name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(claim(None, identity, self.config.lease_duration_seconds(), now)),
            };
            return match self.leases.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    tracing::info!(lease = %self.lease(), %identity, "created the lease and became leader");
                    Ok(Attempt::Claimed)
                }
                Err(kube::Error::Api(status)) if status.is_already_exists() => Ok(Attempt::Raced),
                Err(e) => Err(self.api_error("create", e)),
            };
        };
        let spec = lease.spec.take().unwrap_or_default();
        let decision = decide(&spec, identity, now);
        let seconds = self.config.lease_duration_seconds();
        let spec = match &decision {
            Decision::Wait { holder } => return Ok(Attempt::HeldBy(holder.clone())),
            Decision::Renew => renewed(spec, seconds, now),
            Decision::TakeOver { .. } => claim(Some(&spec), identity, seconds, now),
        };
        let transitions = spec.lease_transitions.unwrap_or(0);
        lease.spec = Some(spec);
        match self.leases.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
            Ok(_) => {
                if let Decision::TakeOver { previous } = decision {
                    let previous = previous.as_deref().unwrap_or("nobody");
                    tracing::info!(
                        lease = %self.lease(), %identity, %previous, transitions,
                        "took over the lease and became leader"
                    );
                    Ok(Attempt::Claimed)
                } else {
                    tracing::trace!(lease = %self.lease(), "renewed the lease");
                    Ok(Attempt::Renewed)
                }
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => Ok(Attempt::Raced),
            Err(e) => Err(self.api_error("update", e)),
        }
    }

    /// Renews until the lease is lost, then flips `lost`. `renewed_at` is when the request
    /// that last wrote our `renewTime` started: candidates may take over `lease_duration`
    /// after that, so we must consider ourselves deposed by then at the latest.
    async fn renew(self, mut renewed_at: Instant, lost: watch::Sender<bool>) {
        loop {
            let deadline = renewed_at + self.config.lease_duration;
            tokio::time::sleep_until(deadline.min(Instant::now() + self.config.renew_interval)).await;
            let started = Instant::now();
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(Attempt::Claimed | Attempt::Renewed)) => {
                    renewed_at = started;
                    continue;
                }
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    tracing::warn!(lease = %self.lease(), %holder, "another replica took the lease; leadership lost");
                    break;
                }
                Ok(Ok(Attempt::Raced)) => tracing::debug!(lease = %self.lease(), "the lease changed while renewing"),
                Ok(Err(error)) => tracing::warn!(lease = %self.lease(), error = %error, "renewing the lease failed"),
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    lease = %self.lease(), duration = ?self.config.lease_duration,
                    "could not renew the lease in time; leadership lost"
                );
                break;
            }
        }
        lost.send_replace(true);
    }

    /// Empties `holderIdentity` if we still hold the lease; a no-op otherwise.
    async fn release(&self) -> Result<(), LeaderError> {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let current = self.leases.get_opt(&self.config.lease_name).await.map_err(|e| self.api_error("read", e))?;
            let Some(mut lease) = current else { return Ok(()) };
            let spec = lease.spec.take().unwrap_or_default();
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                let holder = spec.holder_identity.as_deref().unwrap_or("nobody");
                tracing::info!(lease = %self.lease(), %holder, "the lease is no longer ours; nothing to release");
                return Ok(());
            }
            lease.spec = Some(released(spec, Timestamp::now()));
            match self.leases.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
                Ok(_) => {
                    tracing::info!(lease = %self.lease(), identity = %self.config.identity, "released the lease");
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.is_conflict() => continue,
                Err(e) => return Err(self.api_error("update", e)),
            }
        }
        tracing::warn!(lease = %self.lease(), "the lease kept changing while releasing; leaving it to expire");
        Ok(())
    }
}

impl LeaderGuard {
    /// Resolves when the lease was lost (renewal failed past lease_duration, or another
    /// holder took it). The caller should stop acting as leader at once.
    pub async fn lost(&self) {
        let mut lost = self.lost.clone();
        // An error means the renewer ended without saying so (it panicked): lost as well.
        let _ = lost.wait_for(|lost| *lost).await;
    }

    /// Stops renewing and releases the lease (empties holderIdentity) so a successor takes
    /// over at once. Releasing a lease that was already lost succeeds without writing.
    pub async fn release(mut self) -> Result<(), LeaderError> {
        self.renewer.abort();
        // Wait for the renewer to be gone so that no renewal of ours follows the release.
        let _ = (&mut self.renewer).await;
        self.elector.release().await
    }
}

impl Drop for LeaderGuard {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

/// Whether retrying cannot help: the request was understood and refused for good.
fn is_permanent(error: &LeaderError) -> bool {
    match error {
        LeaderError::Config(_) => true,
        LeaderError::Api { source: kube::Error::Api(status), .. } => {
            // 404 here is a missing namespace (a missing Lease is created, not an error).
            matches!(status.code, 400 | 401 | 403 | 404 | 422)
        }
        LeaderError::Api { .. } => false,
    }
}

/// The pure core of an election round.
fn decide(spec: &LeaseSpec, identity: &str, now: Timestamp) -> Decision {
    let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
    match holder {
        Some(h) if h == identity => Decision::Renew,
        Some(h) if !expired(spec, now) => Decision::Wait { holder: h.to_owned() },
        _ => Decision::TakeOver { previous: holder.map(str::to_owned) },
    }
}

/// `renewTime + leaseDurationSeconds < now`; a lease that was never renewed counts from
/// its acquisition, and one with neither time has nothing proving its holder alive.
fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(MicroTime(renewed)) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else { return true };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    now.duration_since(*renewed) > duration
}

/// The spec of a lease `identity` has just claimed from `previous` (None: a new Lease).
fn claim(previous: Option<&LeaseSpec>, identity: &str, duration_seconds: i32, now: Timestamp) -> LeaseSpec {
    let transitions = match previous {
        None => 0,
        Some(p) if p.holder_identity.as_deref() == Some(identity) => p.lease_transitions.unwrap_or(0),
        Some(p) => p.lease_transitions.unwrap_or(0).saturating_add(1),
    };
    LeaseSpec {
        holder_identity: Some(identity.to_owned()),
        lease_duration_seconds: Some(duration_seconds),
        acquire_time: Some(MicroTime(now)),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..previous.cloned().unwrap_or_default()
    }
}

/// The spec of a lease its holder has just renewed.
fn renewed(spec: LeaseSpec, duration_seconds: i32, now: Timestamp) -> LeaseSpec {
    LeaseSpec { renew_time: Some(MicroTime(now)), lease_duration_seconds: Some(duration_seconds), ..spec }
}

/// The spec of a lease its holder gives up: no holder, and (as client-go does) a one
/// second duration so that candidates which ignore an empty holder still see it expire.
fn released(spec: LeaseSpec, now: Timestamp) -> LeaseSpec {
    LeaseSpec { holder_identity: None, lease_duration_seconds: Some(1), renew_time: Some(MicroTime(now)), ..spec }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("valid timestamp")
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(15),
            acquire_time: Some(MicroTime(at(0))),
            renew_time: Some(MicroTime(at(renewed))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn a_live_lease_of_another_holder_is_waited_for() {
        let spec = held_by("a", 10);
        assert_eq!(decide(&spec, "b", at(25)), Decision::Wait { holder: "a".into() });
    }

    #[test]
    fn an_expired_lease_is_taken_over_and_counts_a_transition() {
        let spec = held_by("a", 10);
        assert_eq!(decide(&spec, "b", at(26)), Decision::TakeOver { previous: Some("a".into()) });
        let claimed = claim(Some(&spec), "b", 15, at(26));
        assert_eq!(claimed.holder_identity.as_deref(), Some("b"));
        assert_eq!(claimed.lease_transitions, Some(4));
        assert_eq!(claimed.acquire_time, Some(MicroTime(at(26))));
    }

    #[test]
    fn our_own_lease_is_renewed_without_a_transition() {
        let spec = held_by("a", 10);
        assert_eq!(decide(&spec, "a", at(100)), Decision::Renew);
        let spec = renewed(spec, 15, at(100));
        assert_eq!(
            (spec.renew_time, spec.acquire_time, spec.lease_transitions),
            (Some(MicroTime(at(100))), Some(MicroTime(at(0))), Some(3))
        );
    }

    #[test]
    fn a_released_lease_is_free_at_once() {
        let spec = released(held_by("a", 10), at(11));
        assert_eq!(decide(&spec, "b", at(11)), Decision::TakeOver { previous: None });
        assert_eq!(claim(Some(&spec), "b", 15, at(11)).lease_transitions, Some(4));
    }

    #[test]
    fn a_lease_without_times_or_holder_is_free() {
        assert_eq!(decide(&LeaseSpec::default(), "b", at(0)), Decision::TakeOver { previous: None });
        let timeless = LeaseSpec { holder_identity: Some("a".into()), ..LeaseSpec::default() };
        assert_eq!(decide(&timeless, "b", at(0)), Decision::TakeOver { previous: Some("a".into()) });
        assert_eq!(claim(None, "b", 15, at(0)).lease_transitions, Some(0));
    }

    fn config(lease_ms: u64, renew_ms: u64) -> LeaderElectionConfig {
        LeaderElectionConfig {
            namespace: "ns".into(),
            lease_name: "operator".into(),
            identity: "a".into(),
            lease_duration: Duration::from_millis(lease_ms),
            renew_interval: Duration::from_millis(renew_ms),
        }
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(config(2000, 500).lease_duration_seconds(), 2);
        assert_eq!(config(1500, 500).lease_duration_seconds(), 2);
    }

    #[test]
    fn configs_that_cannot_work_are_refused() {
        assert!(config(2000, 500).validate().is_ok());
        let errors =
            [config(500, 100), config(2000, 2000), config(2000, 0)].map(|c| c.validate().map_err(|e| e.to_string()));
        assert_eq!(
            errors,
            [
                Err("invalid leader election config: lease_duration must be at least one second".to_owned()),
                Err("invalid leader election config: renew_interval must be positive and shorter than lease_duration"
                    .to_owned()),
                Err("invalid leader election config: renew_interval must be positive and shorter than lease_duration"
                    .to_owned()),
            ]
        );
        let anonymous = LeaderElectionConfig { identity: String::new(), ..config(2000, 500) };
        assert!(matches!(anonymous.validate(), Err(LeaderError::Config("identity must not be empty"))));
    }
}
