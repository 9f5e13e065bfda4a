use serde_json::{Value, json};
use siterecovery_core::assignment::SizingLimits;

use super::*;
use crate::processserver::config::DEFAULT_IMAGE;
use crate::processserver::fleet::CACHE_DIR;
use crate::processserver::lease::{BACKLOG_ANNOTATION, CACHE_FREE_ANNOTATION};

const NOW: &str = "2026-11-27T10:00:00Z";
const GIB: u64 = 1 << 30;

fn now() -> Timestamp {
    NOW.parse().unwrap()
}

fn ago(secs: i64) -> String {
    (now() - jiff::SignedDuration::from_secs(secs)).to_string()
}

fn ps(n: u32) -> String {
    fleet::pod_name(n)
}

fn server(name: &str, pin: Option<&str>, current: Option<&str>, churn: u64) -> ProtectedServer {
    serde_json::from_value(json!({
        "apiVersion": "siterecovery.io/v1alpha1", "kind": "ProtectedServer",
        "metadata": {"name": name, "namespace": "dr"},
        "spec": {
            "policyRef": {"name": "gold"},
            "agent": {"hostname": format!("{name}.example.com")},
            "disks": [{"id": "os", "path": "/dev/sda"}],
            "failoverTarget": {"local": {"directory": "/srv/recovered"}},
            "processServer": pin,
        },
        "status": {"processServer": current, "churn": {"bytesPerSecond": 0, "bytesLast24h": churn}}
    }))
    .unwrap()
}

/// A heartbeat Lease as the process server writes it.
fn lease(ordinal: u32, cache_free: &str, backlog: &str, renewed_secs_ago: i64) -> Lease {
    serde_json::from_value(json!({
        "metadata": {
            "name": format!("sr-ps-{}", ps(ordinal)), "namespace": "dr",
            "labels": {"app.kubernetes.io/component": "process-server"},
            "annotations": {CACHE_FREE_ANNOTATION: cache_free, BACKLOG_ANNOTATION: backlog}
        },
        "spec": {"holderIdentity": ps(ordinal), "leaseDurationSeconds": 60, "renewTime": ago(renewed_secs_ago)}
    }))
    .unwrap()
}

fn healthy(ordinal: u32) -> Lease {
    lease(ordinal, "80", "0", 10)
}

/// An existing StatefulSet with `replicas` and the health levels recorded on it.
fn existing(replicas: i32, health: Value) -> StatefulSet {
    let config = ProcessServerConfig::default();
    let mut set = fleet::stateful_set("dr", &config, replicas as u32, health.to_string(), None);
    set.metadata.generation = Some(1);
    set
}

struct Case {
    servers: Vec<ProtectedServer>,
    leases: Vec<Lease>,
    set: Option<StatefulSet>,
    announced: BTreeSet<String>,
    config: ProcessServerConfig,
}

impl Case {
    fn new(servers: Vec<ProtectedServer>, leases: Vec<Lease>) -> Self {
        Self { servers, leases, set: None, announced: BTreeSet::new(), config: ProcessServerConfig::default() }
    }

    fn with_set(mut self, set: StatefulSet) -> Self {
        self.set = Some(set);
        self
    }

    fn decide(&self) -> Decision {
        let observed = Observed {
            namespace: "dr",
            servers: self.servers.iter().collect(),
            leases: self.leases.iter().collect(),
            stateful_set: self.set.as_ref(),
            announced: &self.announced,
        };
        decide(&observed, &self.config, now())
    }
}

fn applied(d: &Decision) -> (&StatefulSet, &Service) {
    match &d.fleet {
        Fleet::Apply(set, service) => (set, service),
        other => panic!("expected Apply, got {other:?}"),
    }
}

fn placement(d: &Decision) -> BTreeMap<String, Option<String>> {
    d.assignments.iter().map(|a| (a.server.clone(), a.process_server.clone())).collect()
}

fn reasons(notices: &[Notice]) -> Vec<&'static str> {
    notices.iter().map(|n| n.reason).collect()
}

fn server_notice<'a>(d: &'a Decision, server: &str) -> Option<&'a Notice> {
    d.server_notices.iter().find(|(s, _)| s == server).map(|(_, n)| n)
}

#[test]
fn the_statefulset_is_a_hardened_fleet_with_a_cache_volume_and_a_headless_service() {
    let mut case = Case::new(vec![server("db-01", None, None, 0)], vec![]);
    case.config.port = 10443;
    case.config.args = vec!["--log-format".into(), "json".into()];
    case.config.cache_size = "20Gi".into();
    case.config.storage_class = Some("fast".into());
    case.config.service_account = Some("process-server".into());
    let d = case.decide();
    let (set, service) = applied(&d);

    assert_eq!(set.metadata.name.as_deref(), Some(NAME));
    assert_eq!(set.metadata.namespace.as_deref(), Some("dr"));
    assert!(set.metadata.owner_references.is_none(), "the fleet serves many servers: no owner");
    let labels = set.metadata.labels.clone().unwrap();
    assert_eq!(labels["app.kubernetes.io/component"], "process-server");
    assert_eq!(labels["app.kubernetes.io/managed-by"], "siterecovery-operator");
    let spec = set.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(spec.service_name.as_deref(), Some(NAME));
    let retention = spec.persistent_volume_claim_retention_policy.clone().unwrap();
    assert_eq!((retention.when_deleted.as_deref(), retention.when_scaled.as_deref()), (Some("Retain"), Some("Retain")));

    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("process-server"));
    let pod_security = pod.security_context.clone().unwrap();
    assert_eq!((pod_security.run_as_non_root, pod_security.run_as_user), (Some(true), Some(65532)));
    let c = &pod.containers[0];
    assert_eq!(c.image.as_deref(), Some(DEFAULT_IMAGE));
    assert_eq!(c.args.clone().unwrap(), ["--log-format", "json"]);
    assert_eq!(c.ports.clone().unwrap()[0].container_port, 10443);
    let sc = c.security_context.clone().unwrap();
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.capabilities.unwrap().drop.unwrap(), ["ALL"]);
    let requests = c.resources.clone().unwrap().requests.unwrap();
    assert_eq!((requests["cpu"].0.as_str(), requests["memory"].0.as_str()), ("1", "1Gi"));
    let env = c.env.clone().unwrap();
    let field = |name: &str| {
        env.iter().find(|e| e.name == name).and_then(|e| e.value_from.clone()).unwrap().field_ref.unwrap().field_path
    };
    assert_eq!(field("POD_NAME"), "metadata.name");
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert!(env.iter().any(|e| e.name == "SR_LISTEN_PORT" && e.value.as_deref() == Some("10443")));
    let mounts = c.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.name == CACHE_VOLUME && m.mount_path == CACHE_DIR));
    assert_eq!(NAME, "siterecovery-process-server");
    let tls = pod.volumes.clone().unwrap().into_iter().find(|v| v.name == "tls").unwrap().secret.unwrap();
    assert_eq!(tls.secret_name.as_deref(), Some("siterecovery-process-server-tls"), "registration's Secret");

    let claim = &spec.volume_claim_templates.clone().unwrap()[0];
    assert_eq!(fleet::cache_settings(claim), (Some("20Gi".into()), Some("fast".into())));

    let svc = service.spec.clone().unwrap();
    assert_eq!(service.metadata.name.as_deref(), Some(NAME));
    assert_eq!(svc.cluster_ip.as_deref(), Some("None"), "headless: one DNS name per process server");
    assert_eq!(svc.ports.unwrap()[0].port, 10443);
    assert_eq!(svc.selector, spec.selector.match_labels);

    // Round trip through JSON as the API server would see it.
    let value = serde_json::to_value(set).unwrap();
    assert_eq!((value["apiVersion"].as_str(), value["kind"].as_str()), (Some("apps/v1"), Some("StatefulSet")));
}

#[test]
fn replicas_follow_server_count_and_churn_within_the_limits() {
    let many: Vec<ProtectedServer> = (0..250).map(|i| server(&format!("s{i:03}"), None, None, 0)).collect();
    assert_eq!(Case::new(many.clone(), vec![]).decide().replicas, 3, "100 servers per process server");

    let heavy = vec![server("a", None, None, 3_000_000_000_000), server("b", None, None, 2_500_000_000_000)];
    assert_eq!(Case::new(heavy, vec![]).decide().replicas, 3, "5.5 TB/day at 2 TB/day each");

    let mut capped = Case::new(many, vec![]);
    capped.config.limits = SizingLimits { servers_per_process_server: 10, max_replicas: 4, ..SizingLimits::default() };
    assert_eq!(capped.decide().replicas, 4, "never above max replicas");

    let pinned = Case::new(vec![server("a", Some(&ps(3)), None, 0)], vec![]);
    assert_eq!(pinned.decide().replicas, 4, "a pin keeps its process server in the fleet");
}

#[test]
fn servers_are_balanced_then_stay_where_they_are() {
    let servers: Vec<ProtectedServer> = (1..=6).map(|i| server(&format!("s{i}"), None, None, GIB)).collect();
    let leases = vec![healthy(0), healthy(1), healthy(2)];
    let mut case = Case::new(servers, leases);
    case.config.limits.servers_per_process_server = 2;
    let d = case.decide();
    assert_eq!(d.replicas, 3);
    let mut per_ps: BTreeMap<String, usize> = BTreeMap::new();
    for a in &d.assignments {
        *per_ps.entry(a.process_server.clone().unwrap()).or_default() += 1;
    }
    assert_eq!(per_ps.values().copied().collect::<Vec<_>>(), [2, 2, 2], "{per_ps:?}");
    assert_eq!(d.writes.len(), 6);
    assert_eq!(
        reasons(&d.server_notices.iter().map(|(_, n)| n.clone()).collect::<Vec<_>>()),
        ["ProcessServerAssigned"; 6]
    );
    assert!(server_notice(&d, "s1").unwrap().note.starts_with("assigned to siterecovery-process-server-"));

    // Written back, the next pass keeps everything and has nothing to say.
    let placed = placement(&d);
    case.servers = (1..=6)
        .map(|i| {
            let name = format!("s{i}");
            server(&name, None, placed[&name].as_deref(), GIB)
        })
        .collect();
    let again = case.decide();
    assert_eq!(placement(&again), placed, "sticky");
    assert!(again.writes.is_empty() && again.server_notices.is_empty(), "{again:?}");
}

#[test]
fn a_pin_is_honoured_even_against_the_balance() {
    let servers = vec![
        server("a", Some(&ps(1)), None, 0),
        server("b", Some(&ps(1)), Some(&ps(0)), 0),
        server("c", None, None, 0),
    ];
    let d = Case::new(servers, vec![healthy(0), healthy(1)]).decide();
    assert_eq!(placement(&d)["a"].as_deref(), Some(ps(1).as_str()));
    assert_eq!(placement(&d)["b"].as_deref(), Some(ps(1).as_str()));
    assert_eq!(server_notice(&d, "a").unwrap().note, format!("assigned to {} (pinned by spec.processServer)", ps(1)));
    let moved = server_notice(&d, "b").unwrap();
    assert_eq!(
        (moved.reason, moved.note.as_str()),
        (
            "ProcessServerReassigned",
            format!("moved from {} to {}: pinned by spec.processServer", ps(0), ps(1)).as_str()
        )
    );
}

#[test]
fn a_full_cache_makes_a_process_server_critical_and_its_servers_move() {
    let servers = vec![server("a", None, Some(&ps(0)), 0), server("b", None, Some(&ps(1)), 0)];
    let mut case = Case::new(servers, vec![lease(0, "10", "0", 10), healthy(1)]);
    case = case.with_set(existing(2, json!({ps(0): "Healthy", ps(1): "Healthy"})));
    let d = case.decide();
    assert_eq!(placement(&d)["a"].as_deref(), Some(ps(1).as_str()));
    assert_eq!(d.writes, [StatusWrite { server: "a".into(), process_server: Some(ps(1)) }]);
    let moved = server_notice(&d, "a").unwrap();
    assert_eq!(moved.reason, "ProcessServerReassigned");
    assert!(moved.note.contains("is Critical: cache free space 10.0% is below 25%"), "{}", moved.note);
    assert_eq!(reasons(&d.fleet_notices), ["ProcessServerCritical"]);
    assert_eq!(d.fleet_notices[0].type_, EventType::Warning);
    assert!(d.fleet_notices[0].note.starts_with(&format!("{} is Critical: cache free space 10.0%", ps(0))));
    let (set, _) = applied(&d);
    let recorded: Value = serde_json::from_str(&set.annotations()[HEALTH_ANNOTATION]).unwrap();
    assert_eq!(recorded, json!({ps(0): "Critical", ps(1): "Healthy"}));

    // Recorded, the next pass does not announce it again.
    case.set = Some(existing(2, recorded));
    assert!(case.decide().fleet_notices.is_empty());
}

#[test]
fn a_silent_process_server_loses_its_servers() {
    let servers = vec![server("a", None, Some(&ps(0)), 0)];
    let d = Case::new(servers, vec![lease(0, "80", "0", 20 * 60), healthy(1)]).decide();
    assert_eq!(placement(&d)["a"].as_deref(), Some(ps(1).as_str()));
    assert!(server_notice(&d, "a").unwrap().note.contains("last heartbeat 20m ago is older than 15m"));
}

#[test]
fn health_changes_are_announced_once_each() {
    let servers = vec![server("a", None, Some(&ps(0)), 0)];
    let leases = vec![lease(0, "28", "0", 10), healthy(1), healthy(2)];
    let before = json!({ps(0): "Healthy", ps(1): "Warning", ps(3): "Healthy"});
    let mut case = Case::new(servers, leases).with_set(existing(4, before));
    case.config.limits.max_replicas = 4;
    case.servers.push(server("pinned", Some(&ps(3)), None, 0));
    let d = case.decide();
    let notes: Vec<(&str, &str)> = d.fleet_notices.iter().map(|n| (n.reason, n.note.as_str())).collect();
    let expected = [
        (
            "ProcessServerWarning",
            format!(
                "{} is Warning: cache free space 28.0% is below 30%; new servers go to Healthy process servers first",
                ps(0)
            ),
        ),
        ("ProcessServerHealthy", format!("{} is Healthy again", ps(1))),
        ("ProcessServerRegistered", format!("{} joined the fleet: Healthy", ps(2))),
        ("ProcessServerLost", format!("{} no longer reports: its heartbeat Lease sr-ps-{} is gone", ps(3), ps(3))),
    ];
    assert_eq!(notes, expected.iter().map(|(r, n)| (*r, n.as_str())).collect::<Vec<_>>());
    assert_eq!(placement(&d)["a"].as_deref(), Some(ps(0).as_str()), "Warning keeps its servers");
}

#[test]
fn an_unassigned_server_is_announced_once_per_cause() {
    let mut case = Case::new(vec![server("a", None, None, 0)], vec![]);
    let d = case.decide();
    let n = server_notice(&d, "a").unwrap();
    assert_eq!((n.type_, n.reason), (EventType::Warning, "ProcessServerUnassigned"));
    assert!(n.note.contains("waiting for the first process server to report"), "{}", n.note);
    assert!(d.writes.is_empty(), "nothing to remove");

    case.announced = d.announced;
    assert!(case.decide().server_notices.is_empty(), "said once");

    // A different kind of cause is announced again; changing figures, or another wording
    // of the same kind, are not.
    case.leases = vec![lease(0, "10", "0", 10)];
    let d = case.decide();
    assert!(server_notice(&d, "a").unwrap().note.contains("all 1 process servers are Critical"));
    case.announced = d.announced;
    case.leases = vec![lease(0, "12", "0", 10), lease(1, "12", "0", 10)];
    assert!(case.decide().server_notices.is_empty());
    case.servers = vec![server("a", Some(&ps(0)), None, 0)];
    let d = case.decide();
    assert!(server_notice(&d, "a").unwrap().note.contains(&format!("pinned process server {} is Critical", ps(0))));
}

#[test]
fn losing_every_process_server_clears_the_assignment() {
    let d = Case::new(vec![server("a", None, Some(&ps(0)), 0)], vec![lease(0, "80", "0", 3600)]).decide();
    assert_eq!(d.writes, [StatusWrite { server: "a".into(), process_server: None }]);
    let n = server_notice(&d, "a").unwrap();
    assert!(n.note.starts_with(&format!(
        "no longer replicates through {}: process server {} is Critical",
        ps(0),
        ps(0)
    )));
}

#[test]
fn scaling_down_drains_first() {
    let servers = vec![
        server("a", None, Some(&ps(0)), 0),
        server("b", None, Some(&ps(1)), 0),
        server("c", None, Some(&ps(2)), 0),
    ];
    let leases = vec![healthy(0), lease(1, "80", "0", 10), lease(2, "80", "4096", 10)];
    let mut case =
        Case::new(servers, leases).with_set(existing(3, json!({ps(0): "Healthy", ps(1): "Healthy", ps(2): "Healthy"})));
    let d = case.decide();
    assert_eq!(d.replicas, 3, "{} still uploads", ps(2));
    assert!(d.assignments.iter().all(|a| a.process_server.as_deref() == Some(ps(0).as_str())), "{:?}", d.assignments);
    assert_eq!(
        server_notice(&d, "c").unwrap().note,
        format!(
            "moved from {} to {}: process server {} is drained before the fleet scales down to 1",
            ps(2),
            ps(0),
            ps(2)
        )
    );
    assert_eq!(reasons(&d.fleet_notices), ["ScaleDownWaiting"]);

    // Upload done: the StatefulSet shrinks.
    case.leases[2] = lease(2, "80", "0", 10);
    case.servers = ["a", "b", "c"].iter().map(|n| server(n, None, Some(&ps(0)), 0)).collect();
    let d = case.decide();
    assert_eq!(d.replicas, 1);
    assert_eq!(reasons(&d.fleet_notices), ["Scaled"]);
    assert!(d.fleet_notices[0].note.starts_with("3 → 1 process servers for 3 protected servers"));
}

#[test]
fn without_servers_the_fleet_goes_once_uploads_are_done() {
    let set = existing(2, json!({}));
    let uploading = Case::new(vec![], vec![healthy(0), lease(1, "80", "1", 10)]).with_set(set.clone()).decide();
    assert_eq!(uploading.fleet, Fleet::Drain(vec![ps(1)]));
    assert!(uploading.requeue_after.is_some());
    let done = Case::new(vec![], vec![healthy(0), healthy(1)]).with_set(set).decide();
    assert_eq!(done.fleet, Fleet::Delete);
    assert_eq!(Case::new(vec![], vec![healthy(0)]).decide().fleet, Fleet::Absent);
}

#[test]
fn the_next_pass_comes_when_a_heartbeat_crosses_a_threshold() {
    let d =
        Case::new(vec![server("a", None, None, 0)], vec![lease(0, "80", "0", 60), lease(1, "80", "0", 400)]).decide();
    // ps-0 turns Warning in 240s, before ps-1 (already Warning) turns Critical in 500s.
    assert_eq!(d.requeue_after, Some(Duration::from_secs(241)));
}

#[test]
fn cache_settings_of_an_existing_fleet_are_kept_and_the_difference_announced() {
    let mut case = Case::new(vec![server("a", None, None, 0)], vec![healthy(0)]).with_set(existing(1, json!({})));
    case.config.cache_size = "500Gi".into();
    let d = case.decide();
    let (set, _) = applied(&d);
    let claim = &set.spec.as_ref().unwrap().volume_claim_templates.clone().unwrap()[0];
    assert_eq!(fleet::cache_settings(claim).0.as_deref(), Some("100Gi"), "claim templates cannot change");
    let notice = d.fleet_notices.iter().find(|n| n.reason == "CacheSettingsNotApplied").unwrap();
    assert!(notice.note.contains("keep size 100Gi"), "{}", notice.note);
    case.announced = d.announced;
    assert!(case.decide().fleet_notices.iter().all(|n| n.reason != "CacheSettingsNotApplied"));
}

#[test]
fn a_critical_process_server_gets_a_spare_within_the_limit() {
    let servers = vec![server("a", None, Some(&ps(0)), 0)];
    let d = Case::new(servers.clone(), vec![lease(0, "10", "0", 10)]).decide();
    assert_eq!(d.replicas, 2, "one spare for the Critical one");
    let d = Case::new(servers.clone(), vec![lease(0, "10", "0", 10), lease(1, "10", "0", 10)]).decide();
    assert_eq!(d.replicas, 3, "and one for a Critical spare");
    let mut capped = Case::new(servers, vec![lease(0, "10", "0", 10)]);
    capped.config.limits.max_replicas = 1;
    assert_eq!(capped.decide().replicas, 1);
}
