//! One watch per kind, shared by every part of the operator that looks at that kind
//! (kube-rs' shared-stream pattern): the ProtectedServer controller, the policy, plan and
//! failback controllers that follow servers, agent registration and the process-server
//! fleet all read one cache of ProtectedServers instead of keeping one watch and one
//! full copy each, and policies are read from a cache instead of a GET per reconcile.
//!
//! [`reflect`] runs the watch into a [`Store`] (managed fields dropped: nothing reads
//! them, and they are a large part of every object) and announces every change on a
//! broadcast channel. A subscriber ([`Reflected::changes`]) starts with the whole cache
//! once the first list is complete, then follows the changes; one that falls behind by
//! more than the channel holds is handed the whole cache again instead of the changes
//! it missed, so nothing waits on a slow subscriber and no change is lost.
//!
//! kube-runtime's own `store_shared` is not used: its subscriber handle parks (returns
//! `Pending` without arranging a wake-up) when an announced object has left the cache
//! before it was read, and a full channel holds up the watch for every subscriber.
//!
//! Readiness: `Store::wait_until_ready` wakes only the last of several tasks waiting at
//! once (kube-runtime 5's `DelayedInit` keeps a single waker), and every controller
//! built on a store waits on it when it starts. So wait with [`Reflected::ready`] (or
//! [`Watches::ready`]) before starting anything that reads a shared cache: once it has
//! resolved, the store answers every later wait at once.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;

use futures::{Stream, StreamExt, stream};
use kube::Resource;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};
use tracing::warn;

/// Changes a subscriber may fall behind by before it is handed the whole cache instead.
const BACKLOG: usize = 1024;

/// A change to the cache.
#[derive(Debug)]
pub enum Change<K> {
    /// Created or modified: the object as cached.
    Applied(Arc<K>),
    /// Deleted: its last state.
    Deleted(Arc<K>),
    /// The cache was (re)filled from a list, or the subscriber fell behind: look at all of it.
    Relisted,
}

impl<K> Clone for Change<K> {
    fn clone(&self) -> Self {
        match self {
            Self::Applied(o) => Self::Applied(o.clone()),
            Self::Deleted(o) => Self::Deleted(o.clone()),
            Self::Relisted => Self::Relisted,
        }
    }
}

/// Bounds of a kind that can be reflected.
pub trait Watched: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static {}
impl<K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static> Watched for K {}

/// A cache of one kind, and the changes to it.
pub struct Reflected<K: Watched> {
    store: Store<K>,
    changes: broadcast::Sender<Change<K>>,
    /// Whether the first list is complete (see the module documentation for why not the
    /// store's own readiness).
    listed: watch::Receiver<bool>,
}

impl<K: Watched> Clone for Reflected<K> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), changes: self.changes.clone(), listed: self.listed.clone() }
    }
}

/// A shared watch of `api`: the cache and its changes, and the future that runs the
/// watch (poll it for as long as the cache is used; it retries failures with backoff).
pub fn reflect<K: Watched>(api: Api<K>, config: watcher::Config) -> (Reflected<K>, impl Future<Output = ()> + Send) {
    let (store, writer) = reflector::store();
    let (changes, _) = broadcast::channel(BACKLOG);
    let (listed_tx, listed) = watch::channel(false);
    let reflected = Reflected { store: store.clone(), changes: changes.clone(), listed };
    let kind = K::kind(&()).into_owned();
    let run = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .for_each(move |event| {
            let change = match event {
                Ok(watcher::Event::Apply(o)) => store.get(&ObjectRef::from_obj(&o)).map(Change::Applied),
                Ok(watcher::Event::Delete(o)) => Some(Change::Deleted(Arc::new(o))),
                Ok(watcher::Event::InitDone) => {
                    listed_tx.send_replace(true);
                    Some(Change::Relisted)
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => {
                    warn!(error = %e, kind = %kind, "watch failed; retrying");
                    None
                }
            };
            if let Some(change) = change {
                // No subscriber yet is fine: each starts from the whole cache.
                let _ = changes.send(change);
            }
            futures::future::ready(())
        });
    (reflected, run)
}

impl<K: Watched> Reflected<K> {
    /// The cache (complete once [`Self::ready`] resolves).
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Resolves once the first list is in the cache; any number of tasks may wait.
    /// Never resolves if the watch is never run.
    pub async fn ready(&self) {
        let _ = self.listed.clone().wait_for(|listed| *listed).await;
        // Marks the store itself ready for every later `wait_until_ready` (the value is
        // there, so this returns at once).
        let _ = self.store.wait_until_ready().await;
    }

    /// Every change from now on, starting with [`Change::Relisted`] once the first list
    /// is complete. A subscriber that falls behind gets [`Change::Relisted`] instead of
    /// what it missed.
    pub fn changes(&self) -> impl Stream<Item = Change<K>> + Send + 'static {
        let rx = self.changes.subscribe();
        let listed = self.listed.clone();
        stream::unfold((rx, listed, false), |(mut rx, mut listed, started)| async move {
            if !started {
                // Err only when the watch is gone for good, and then so are the changes.
                listed.wait_for(|listed| *listed).await.ok()?;
                return Some((Change::Relisted, (rx, listed, true)));
            }
            let change = match rx.recv().await {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(_)) => Change::Relisted,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((change, (rx, listed, true)))
        })
    }

    /// Objects created or modified, for a controller's own kind (`Controller::for_shared_stream`).
    /// With `print`, only those whose print changed since last seen (a relist passes only
    /// what differs); without, every change and the whole cache on a relist.
    pub fn applied(&self, print: Option<fn(&K) -> u64>) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.select(print, false)
    }

    /// Objects created, modified or deleted, for the watches of other kinds
    /// (`Controller::watches_shared_stream`), filtered by `print` as in [`Self::applied`].
    pub fn touched(&self, print: Option<fn(&K) -> u64>) -> impl Stream<Item = Arc<K>> + Send + 'static {
        self.select(print, true)
    }

    fn select(&self, print: Option<fn(&K) -> u64>, deletes: bool) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let store = self.store.clone();
        let mut seen = Seen::default();
        self.changes().flat_map(move |change| {
            let objects = match change {
                Change::Applied(o) => seen.applied(o, print).into_iter().collect(),
                Change::Deleted(o) => {
                    seen.prints.remove(&ObjectRef::from_obj(o.as_ref()));
                    if deletes { vec![o] } else { Vec::new() }
                }
                Change::Relisted => seen.relisted(store.state(), print),
            };
            stream::iter(objects)
        })
    }
}

/// The last print of every object a filtered subscriber passed on.
struct Seen<K: Watched> {
    prints: HashMap<ObjectRef<K>, u64>,
}

impl<K: Watched> Default for Seen<K> {
    fn default() -> Self {
        Self { prints: HashMap::new() }
    }
}

impl<K: Watched> Seen<K> {
    fn applied(&mut self, o: Arc<K>, print: Option<fn(&K) -> u64>) -> Option<Arc<K>> {
        let Some(print) = print else { return Some(o) };
        let p = print(&o);
        (self.prints.insert(ObjectRef::from_obj(o.as_ref()), p) != Some(p)).then_some(o)
    }

    fn relisted(&mut self, objects: Vec<Arc<K>>, print: Option<fn(&K) -> u64>) -> Vec<Arc<K>> {
        let Some(print) = print else { return objects };
        let mut prints = HashMap::with_capacity(objects.len());
        let changed = objects
            .into_iter()
            .filter(|o| {
                let key = ObjectRef::from_obj(o.as_ref());
                let p = print(o);
                prints.insert(key.clone(), p);
                self.prints.get(&key) != Some(&p)
            })
            .collect();
        self.prints = prints;
        changed
    }
}

/// Hashes the parts of an object a subscriber looks at (for the `print` filters).
pub fn fingerprint(parts: impl std::hash::Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// The ProtectedServer and ReplicationPolicy caches every part of the operator shares.
#[derive(Clone)]
pub struct Watches {
    /// Every ProtectedServer in scope.
    pub servers: Reflected<siterecovery_api::ProtectedServer>,
    /// Every ReplicationPolicy in scope.
    pub policies: Reflected<siterecovery_api::ReplicationPolicy>,
}

impl Watches {
    /// Both watches, in `namespace` or cluster-wide; run the returned future for as long
    /// as they are used.
    pub fn new(client: &kube::Client, namespace: Option<&str>) -> (Self, impl Future<Output = ()> + Send + use<>) {
        let (servers, run_servers) = reflect(scoped(client, namespace), watcher::Config::default());
        let (policies, run_policies) = reflect(scoped(client, namespace), watcher::Config::default());
        let run = async move {
            tokio::join!(run_servers, run_policies);
        };
        (Self { servers, policies }, run)
    }

    /// Resolves once both caches hold their first list (see [`Reflected::ready`]).
    pub async fn ready(&self) {
        self.servers.ready().await;
        self.policies.ready().await;
    }
}

fn scoped<K: Watched + Resource<Scope = k8s_openapi::NamespaceResourceScope>>(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Api<K> {
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn cm(name: &str, value: &str) -> Arc<ConfigMap> {
        Arc::new(ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() },
            data: Some([("v".to_owned(), value.to_owned())].into()),
            ..Default::default()
        })
    }

    fn value(c: &ConfigMap) -> u64 {
        fingerprint(c.data.as_ref().and_then(|d| d.get("v")))
    }

    fn names(objects: &[Arc<ConfigMap>]) -> Vec<String> {
        use kube::ResourceExt;
        objects.iter().map(|o| o.name_any()).collect()
    }

    #[test]
    fn a_filtered_subscriber_passes_only_changed_prints() {
        let mut seen = Seen::default();
        assert!(seen.applied(cm("a", "1"), Some(value)).is_some(), "first sight passes");
        assert!(seen.applied(cm("a", "1"), Some(value)).is_none(), "same print is dropped");
        assert!(seen.applied(cm("a", "2"), Some(value)).is_some(), "a new print passes");
        assert!(seen.applied(cm("a", "2"), None).is_some(), "unfiltered passes everything");
    }

    #[test]
    fn a_relist_passes_what_differs_and_forgets_what_is_gone() {
        let mut seen = Seen::default();
        seen.applied(cm("a", "1"), Some(value));
        seen.applied(cm("b", "1"), Some(value));
        let passed = seen.relisted(vec![cm("a", "1"), cm("b", "2"), cm("c", "1")], Some(value));
        assert_eq!(names(&passed), ["b", "c"]);
        assert_eq!(seen.prints.len(), 3);
        let passed = seen.relisted(vec![cm("a", "1")], Some(value));
        assert!(passed.is_empty());
        assert_eq!(seen.prints.len(), 1, "b and c are forgotten");
        assert_eq!(names(&seen.relisted(vec![cm("a", "1"), cm("b", "2")], None)), ["a", "b"]);
    }
}
