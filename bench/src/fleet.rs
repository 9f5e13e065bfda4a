//! The estate a scale benchmark creates — policies and servers spread across them —
//! created with bounded concurrency, and a watch that times how long it takes until
//! every server reaches a state.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use anyhow::bail;
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use siterecovery_api::server::ServerConditionType;
use siterecovery_api::{ConditionStatus, ProtectedServer, ReplicationPolicy, ServerPhase};
use siterecovery_e2e::fixtures;
use tokio::time::Instant;

/// Name of the `i`th policy.
pub fn policy_name(i: usize) -> String {
    format!("policy-{i:02}")
}

/// Name of the `i`th server.
pub fn server_name(i: usize) -> String {
    format!("srv-{i:04}")
}

/// The e2e fixture policy with another RPO threshold (the fixture's 2m would raise RPO
/// alerts on every server while a slow run is still measuring).
pub fn policy(name: &str, rpo_threshold: &str) -> anyhow::Result<ReplicationPolicy> {
    let mut value = serde_json::to_value(fixtures::policy(name))?;
    value["spec"]["rpoThreshold"] = json!(rpo_threshold);
    Ok(serde_json::from_value(value)?)
}

/// The e2e fixture server `name`, using policy `policy`.
pub fn server(name: &str, policy: &str) -> ProtectedServer {
    let mut server = fixtures::server(name);
    server.spec.policy_ref.name = policy.to_owned();
    server
}

/// Runs `task(0..count)` with at most `in_flight` running at once; stops at the first
/// error. Returns how long it took.
pub async fn bounded<F, Fut>(count: usize, in_flight: usize, task: F) -> anyhow::Result<Duration>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let start = Instant::now();
    futures::stream::iter((0..count).map(task))
        .buffer_unordered(in_flight.max(1))
        .try_for_each(|()| async { Ok(()) })
        .await?;
    Ok(start.elapsed())
}

/// The server has a status: the operator has seen it, added its finalizer and issued
/// the agent identity (both happen before its first status write).
pub fn enrolled(server: &ProtectedServer) -> bool {
    server.status.as_ref().is_some_and(|s| s.phase.is_some())
}

/// The server is `Protected` with `Ready=True` (the steady state of a healthy estate).
pub fn protected_and_ready(server: &ProtectedServer) -> bool {
    let Some(status) = &server.status else { return false };
    let ready = fixtures::condition(&status.conditions, ServerConditionType::Ready)
        .is_some_and(|(s, _, _)| s == ConditionStatus::True);
    status.phase == Some(ServerPhase::Protected) && ready
}

/// A short description of where a server is, for the summary of a run that timed out.
pub fn describe(server: &ProtectedServer) -> String {
    let Some(status) = &server.status else { return "no status".into() };
    let ready = fixtures::condition(&status.conditions, ServerConditionType::Ready)
        .map(|(s, reason, _)| format!("Ready={s:?} ({reason})"))
        .unwrap_or_else(|| "no Ready condition".into());
    format!("{:?}, {ready}", status.phase.unwrap_or(ServerPhase::Enabling))
}

/// Watches the servers of `api` until `expected` of them satisfy `done`, and returns
/// the time since `since` at which the last one was seen to. Fails after `timeout`
/// with how many got there and where the others are.
pub async fn wait_all(
    api: Api<ProtectedServer>,
    expected: usize,
    since: Instant,
    timeout: Duration,
    done: fn(&ProtectedServer) -> bool,
) -> anyhow::Result<Duration> {
    let mut seen: HashMap<String, (bool, String)> = HashMap::new();
    let mut satisfied = 0usize;
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let deadline = since + timeout;
    loop {
        let event = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(event)) => event?,
            Ok(None) => bail!("the watch ended"),
            Err(_) => {
                let mut states: BTreeMap<&str, usize> = BTreeMap::new();
                for (_, state) in seen.values() {
                    *states.entry(state.as_str()).or_default() += 1;
                }
                bail!("after {timeout:?} only {satisfied} of {expected} servers got there; states seen: {states:?}");
            }
        };
        match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) => {
                let now_done = done(&s);
                if let Some((was_done, _)) = seen.insert(s.name_any(), (now_done, describe(&s)))
                    && was_done
                {
                    satisfied -= 1;
                }
                satisfied += usize::from(now_done);
            }
            watcher::Event::Delete(s) => {
                if let Some((true, _)) = seen.remove(&s.name_any()) {
                    satisfied -= 1;
                }
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        if satisfied >= expected {
            return Ok(since.elapsed());
        }
    }
}

/// Counts the modifications of the servers in `namespace` (metadata-only watch) until `until`,
/// ignoring the initial listing: every status write of any field manager counts once.
pub async fn count_writes(client: kube::Client, namespace: &str, until: Instant) -> anyhow::Result<u64> {
    let api: Api<PartialObjectMeta<ProtectedServer>> = Api::namespaced(client, namespace);
    let stream = watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut listed = false;
    let mut writes = 0u64;
    while let Ok(Some(event)) = tokio::time::timeout_at(until, stream.next()).await {
        match event? {
            watcher::Event::InitDone => listed = true,
            watcher::Event::Apply(_) | watcher::Event::Delete(_) if listed => writes += 1,
            _ => {}
        }
    }
    Ok(writes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_in_creation_order() {
        assert_eq!(server_name(7), "srv-0007");
        assert!(server_name(99) < server_name(100));
        assert_eq!(policy_name(3), "policy-03");
    }

    #[test]
    fn server_and_policy_keep_the_fixture_but_their_own_references() {
        let s = server("srv-0001", "policy-01");
        assert_eq!(s.spec.policy_ref.name, "policy-01");
        assert_eq!(s.spec.agent.hostname, "srv-0001.example.com");
        let p = policy("policy-01", "15m").unwrap();
        assert_eq!(serde_json::to_value(&p).unwrap()["spec"]["rpoThreshold"], "15m");
    }

    #[test]
    fn states_are_read_from_status() {
        let mut s = server("srv-0001", "policy-01");
        assert!(!enrolled(&s));
        assert_eq!(describe(&s), "no status");
        s.status = Some(
            serde_json::from_value(json!({"phase": "Protected", "conditions": [
            {"type": "Ready", "status": "True", "reason": "Protected", "message": "RPO 3s",
             "lastTransitionTime": "2025-01-01T00:00:00Z"}]}))
            .unwrap(),
        );
        assert!(enrolled(&s));
        assert!(protected_and_ready(&s));
        assert_eq!(describe(&s), "Protected, Ready=True (Protected)");
    }
}
