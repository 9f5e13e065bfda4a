//! The operator's shared watch (`siterecovery_operator::watch`) against the real API
//! server: every subscriber and a controller built on the cache see a new object, and
//! a deletion reaches the subscribers that follow deletions. Several parts of the
//! operator start on one cache at once, so this also guards against a readiness wait
//! that wakes only one of them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::{Resource, ResourceExt};
use siterecovery_api::ReplicationPolicy;
use siterecovery_e2e::{TestNamespace, client, fixtures, install_crds};
use siterecovery_operator::watch::{Change, Watches};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subscriber_and_controller_sees_changes() -> anyhow::Result<()> {
    let admin = client().await?;
    install_crds(&admin).await?;
    let ns = TestNamespace::create(&admin, "shared-watch").await?;
    let (watches, run) = Watches::new(&admin, Some(&ns.name));
    let watch = tokio::spawn(run);
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<String>();

    // Three consumers wait for the first list at the same time, as the operator's do.
    for who in ["applied", "touched"] {
        let stream = if who == "applied" {
            watches.policies.applied(None).boxed()
        } else {
            watches.policies.touched(None).boxed()
        };
        let tx = seen_tx.clone();
        tokio::spawn(stream.for_each(move |p| {
            let _ = tx.send(format!("{who} {}{}", p.name_any(), deleting(&p)));
            async {}
        }));
    }
    let tx = seen_tx.clone();
    let changes = watches.policies.changes();
    tokio::spawn(changes.for_each(move |c| {
        if let Change::Deleted(p) = c {
            let _ = tx.send(format!("deleted {}", p.name_any()));
        }
        async {}
    }));
    watches.ready().await;
    let tx = seen_tx.clone();
    let controller = Controller::for_shared_stream(watches.policies.applied(None), watches.policies.store())
        .run(
            move |p: Arc<ReplicationPolicy>, _: Arc<()>| {
                let _ = tx.send(format!("reconciled {}", p.name_any()));
                async { Ok::<_, kube::Error>(Action::await_change()) }
            },
            |_, _, _| Action::await_change(),
            Arc::new(()),
        )
        .for_each(|_| async {});
    let controller = tokio::spawn(controller);

    let policies: Api<ReplicationPolicy> = Api::namespaced(admin.clone(), &ns.name);
    policies.create(&PostParams::default(), &fixtures::policy("gold")).await?;
    expect(&mut seen, &["applied gold", "touched gold", "reconciled gold"]).await?;
    let cached = watches.policies.store().get(&kube::runtime::reflector::ObjectRef::new("gold").within(&ns.name));
    let cached = cached.ok_or_else(|| anyhow::anyhow!("gold is not in the cache"))?;
    assert!(cached.meta().managed_fields.is_none(), "managed fields are dropped from the cache");

    policies.delete("gold", &DeleteParams::default()).await?;
    expect(&mut seen, &["deleted gold"]).await?;
    controller.abort();
    watch.abort();
    Ok(())
}

fn deleting(p: &ReplicationPolicy) -> &'static str {
    if p.meta().deletion_timestamp.is_some() { " (deleting)" } else { "" }
}

/// Waits until every one of `wanted` has been seen (in any order, among others).
async fn expect(seen: &mut mpsc::UnboundedReceiver<String>, wanted: &[&str]) -> anyhow::Result<()> {
    let mut missing: Vec<&str> = wanted.to_vec();
    let deadline = tokio::time::Instant::now() + WAIT;
    while !missing.is_empty() {
        match tokio::time::timeout_at(deadline, seen.recv()).await {
            Ok(Some(what)) => missing.retain(|w| *w != what),
            _ => anyhow::bail!("not seen within {WAIT:?}: {missing:?}"),
        }
    }
    Ok(())
}
