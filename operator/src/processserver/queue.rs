//! What makes the fleet loop run a namespace, and when: watch events filtered down to
//! the changes the fleet looks at ([`Fingerprints`]), and a per-namespace due time that
//! gathers bursts of changes into one pass ([`Queue`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use kube::ResourceExt;
use kube::runtime::watcher::Event;
use tokio::time::Instant;

use crate::watch::Change;

/// Hashes the parts of an object that the fleet looks at.
pub fn fingerprint(parts: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// Last fingerprint of every object of one kind, to turn watch events into the
/// namespaces whose pass may come out differently.
#[derive(Debug, Default)]
pub struct Fingerprints {
    seen: HashMap<(String, String), u64>,
    /// Objects listed since the watch (re)started, swapped in when the list is complete.
    relist: Option<HashMap<(String, String), u64>>,
}

impl Fingerprints {
    /// The namespaces to run after `event` (sorted, without repeats).
    pub fn observe<K: ResourceExt>(&mut self, event: &Event<K>, print: impl Fn(&K) -> u64) -> Vec<String> {
        match event {
            Event::Apply(o) => self.applied(o, print),
            Event::Delete(o) => self.deleted(o),
            Event::Init => {
                self.relist = Some(HashMap::new());
                Vec::new()
            }
            Event::InitApply(o) => {
                self.relist.get_or_insert_default().insert(key(o), print(o));
                Vec::new()
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                self.listed(listed)
            }
        }
    }

    /// The namespaces to run after a change to a shared cache; `cached` is what the cache
    /// holds, read only when the whole of it is to be compared.
    pub fn observe_change<K: ResourceExt>(
        &mut self,
        change: &Change<K>,
        cached: impl FnOnce() -> Vec<Arc<K>>,
        print: impl Fn(&K) -> u64,
    ) -> Vec<String> {
        match change {
            Change::Applied(o) => self.applied(o.as_ref(), print),
            Change::Deleted(o) => self.deleted(o.as_ref()),
            Change::Relisted => {
                let listed = cached().iter().map(|o| (key(o.as_ref()), print(o))).collect();
                self.listed(listed)
            }
        }
    }

    fn applied<K: ResourceExt>(&mut self, o: &K, print: impl Fn(&K) -> u64) -> Vec<String> {
        let k = key(o);
        let ns = k.0.clone();
        let p = print(o);
        if self.seen.insert(k, p) == Some(p) { Vec::new() } else { vec![ns] }
    }

    fn deleted<K: ResourceExt>(&mut self, o: &K) -> Vec<String> {
        let k = key(o);
        self.seen.remove(&k);
        vec![k.0]
    }

    /// Compares a complete list with what was known before: objects deleted while the
    /// watch was down show up only as absences from the new list.
    fn listed(&mut self, listed: HashMap<(String, String), u64>) -> Vec<String> {
        let mut namespaces = BTreeSet::new();
        for (k, print) in &listed {
            if self.seen.get(k) != Some(print) {
                namespaces.insert(k.0.clone());
            }
        }
        for k in self.seen.keys().filter(|k| !listed.contains_key(*k)) {
            namespaces.insert(k.0.clone());
        }
        self.seen = listed;
        namespaces.into_iter().collect()
    }
}

fn key<K: ResourceExt>(o: &K) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// When each namespace is due for a pass.
#[derive(Debug, Default)]
pub struct Queue {
    due: HashMap<String, Instant>,
}

impl Queue {
    /// Runs `namespace` at `at`, or earlier if it is already due earlier.
    pub fn schedule(&mut self, namespace: String, at: Instant) {
        self.due.entry(namespace).and_modify(|t| *t = (*t).min(at)).or_insert(at);
    }

    /// The earliest due time.
    pub fn next(&self) -> Option<Instant> {
        self.due.values().min().copied()
    }

    /// Removes and returns the namespaces due at `now`, in name order.
    pub fn take_due(&mut self, now: Instant) -> Vec<String> {
        let mut due: Vec<String> = self.due.iter().filter(|(_, t)| **t <= now).map(|(n, _)| n.clone()).collect();
        due.sort();
        for n in &due {
            self.due.remove(n);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn cm(ns: &str, name: &str, value: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some(ns.into()), ..Default::default() },
            data: Some([("v".to_owned(), value.to_owned())].into()),
            ..Default::default()
        }
    }

    fn value(c: &ConfigMap) -> u64 {
        fingerprint(c.data.as_ref().and_then(|d| d.get("v")))
    }

    #[test]
    fn only_changes_of_the_fingerprint_trigger() {
        let mut f = Fingerprints::default();
        assert_eq!(f.observe(&Event::Apply(cm("a", "x", "1")), value), ["a"]);
        assert!(f.observe(&Event::Apply(cm("a", "x", "1")), value).is_empty(), "same fingerprint");
        assert_eq!(f.observe(&Event::Apply(cm("a", "x", "2")), value), ["a"]);
        assert_eq!(f.observe(&Event::Delete(cm("a", "x", "2")), value), ["a"], "deletions always trigger");
        assert_eq!(f.observe(&Event::Apply(cm("a", "x", "2")), value), ["a"], "re-created");
    }

    #[test]
    fn a_relist_triggers_changed_new_and_vanished_objects() {
        let mut f = Fingerprints::default();
        for e in [Event::Init, Event::InitApply(cm("a", "x", "1")), Event::InitApply(cm("b", "y", "1"))] {
            assert!(f.observe(&e, value).is_empty(), "nothing before the list is complete");
        }
        assert_eq!(f.observe(&Event::<ConfigMap>::InitDone, value), ["a", "b"]);
        // The watch restarts: y changed, x vanished, z is new, w in c is unchanged.
        f.observe(&Event::Apply(cm("c", "w", "1")), value);
        f.observe(&Event::<ConfigMap>::Init, value);
        for e in [
            Event::InitApply(cm("b", "y", "2")),
            Event::InitApply(cm("d", "z", "1")),
            Event::InitApply(cm("c", "w", "1")),
        ] {
            f.observe(&e, value);
        }
        assert_eq!(f.observe(&Event::<ConfigMap>::InitDone, value), ["a", "b", "d"]);
    }

    #[test]
    fn the_queue_keeps_the_earliest_time_per_namespace() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        q.schedule("b".into(), t0 + Duration::from_secs(5));
        q.schedule("a".into(), t0 + Duration::from_secs(2));
        q.schedule("b".into(), t0 + Duration::from_secs(1));
        q.schedule("a".into(), t0 + Duration::from_secs(9));
        assert_eq!(q.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(q.take_due(t0 + Duration::from_secs(1)), ["b"]);
        assert!(q.take_due(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(q.take_due(t0 + Duration::from_secs(3)), ["a"]);
        assert_eq!(q.next(), None);
    }
}
