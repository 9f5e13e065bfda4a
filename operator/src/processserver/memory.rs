//! Read-your-writes for the fleet loop: what a pass wrote, kept until the watch caches
//! show it.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use siterecovery_api::ProtectedServer;

/// What the loop remembers about a namespace between passes: the one-off announcements
/// made, and its own writes until the caches show them. A pass can come before the watch
/// delivers the previous pass's writes; without this it would see the old assignments
/// and health levels, and announce the same changes twice.
#[derive(Debug, Default)]
pub(super) struct Memory {
    pub(super) announced: BTreeSet<String>,
    /// The StatefulSet as applied, with the resourceVersion the cache had before.
    pub(super) set: Option<(Option<String>, Arc<StatefulSet>)>,
    /// `status.processServer` as written, by server, with the resourceVersion before.
    pub(super) assignments: HashMap<String, (Option<String>, Option<String>)>,
}

impl Memory {
    pub(super) fn is_empty(&self) -> bool {
        self.announced.is_empty() && self.set.is_none() && self.assignments.is_empty()
    }

    /// The cached StatefulSet, or the one last applied while the cache still holds the
    /// version from before.
    pub(super) fn stateful_set(&mut self, cached: Option<Arc<StatefulSet>>) -> Option<Arc<StatefulSet>> {
        match self.set.take() {
            Some((before, applied)) if cached.as_ref().map(|s| s.resource_version()) == Some(before.clone()) => {
                self.set = Some((before, applied.clone()));
                Some(applied)
            }
            _ => cached,
        }
    }

    /// The cached servers, with the assignments written since where the cache still
    /// holds the version from before.
    pub(super) fn servers(&mut self, cached: Vec<Arc<ProtectedServer>>) -> Vec<Arc<ProtectedServer>> {
        let mut still_stale = HashMap::new();
        let servers = cached
            .into_iter()
            .map(|s| match self.assignments.remove(&s.name_any()) {
                Some((before, written)) if s.resource_version() == before => {
                    let mut fresh = (*s).clone();
                    fresh.status.get_or_insert_default().process_server = written.clone();
                    still_stale.insert(s.name_any(), (before, written));
                    Arc::new(fresh)
                }
                _ => s,
            })
            .collect();
        self.assignments = still_stale;
        servers
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn server(rv: &str, current: Option<&str>) -> Arc<ProtectedServer> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
                "metadata": {"name": "a", "namespace": "dr", "resourceVersion": rv},
                "spec": {"policyRef": {"name": "gold"}, "agent": {"hostname": "a"},
                         "disks": [{"id": "os", "path": "/dev/sda"}],
                         "failoverTarget": {"local": {"directory": "/srv"}}},
                "status": {"processServer": current}
            }))
            .unwrap(),
        )
    }

    fn current(servers: &[Arc<ProtectedServer>]) -> Option<String> {
        servers[0].status.as_ref().and_then(|s| s.process_server.clone())
    }

    #[test]
    fn a_pass_sees_its_own_writes_until_the_cache_does() {
        let mut memory = Memory::default();
        memory.assignments.insert("a".into(), (Some("7".into()), Some("ps-1".into())));
        assert_eq!(current(&memory.servers(vec![server("7", None)])).as_deref(), Some("ps-1"), "cache is behind");
        assert!(!memory.is_empty());
        assert_eq!(current(&memory.servers(vec![server("8", Some("ps-2"))])).as_deref(), Some("ps-2"), "caught up");
        assert!(memory.is_empty(), "forgotten once the cache moved on");

        let mut set = StatefulSet::default();
        set.metadata.resource_version = Some("3".into());
        let mut applied = set.clone();
        applied.metadata.resource_version = Some("4".into());
        memory.set = Some((Some("3".into()), Arc::new(applied)));
        let seen = memory.stateful_set(Some(Arc::new(set.clone())));
        assert_eq!(seen.unwrap().metadata.resource_version.as_deref(), Some("4"));
        set.metadata.resource_version = Some("5".into());
        let seen = memory.stateful_set(Some(Arc::new(set)));
        assert_eq!(seen.unwrap().metadata.resource_version.as_deref(), Some("5"));
        assert!(memory.set.is_none());
    }
}
