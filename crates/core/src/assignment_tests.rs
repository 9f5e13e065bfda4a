//! Unit tests of `assignment.rs`, kept apart so each file stays small.

use super::*;
use AssignmentReason::*;

const TB: u64 = 1_000_000_000_000;

fn now() -> Timestamp {
    "2025-01-01T12:00:00Z".parse().unwrap()
}

fn report(free: f64, backlog_gib: u64, silent_secs: i64) -> ProcessServerReport {
    ProcessServerReport {
        cache_free_percent: free,
        upload_backlog_bytes: backlog_gib * GIB,
        last_heartbeat: now() - jiff::SignedDuration::from_secs(silent_secs),
    }
}

fn ps(name: &str, health: Health) -> ProcessServerState {
    ProcessServerState { name: name.into(), health }
}

fn healthy(names: &[&str]) -> Vec<ProcessServerState> {
    names.iter().map(|n| ps(n, Health::Healthy)).collect()
}

fn srv(name: &str, churn: u64, current: Option<&str>) -> ServerLoad {
    ServerLoad {
        name: name.into(),
        pinned: None,
        current: current.map(Into::into),
        churn_bytes_per_day: churn,
        consistency_group: None,
    }
}

fn many(n: usize, churn: impl Fn(usize) -> u64) -> Vec<ServerLoad> {
    (0..n).map(|i| srv(&format!("s{i:03}"), churn(i), None)).collect()
}

/// Feeds an assignment back as the servers' current process servers, as status would.
fn settle(servers: &mut [ServerLoad], result: &[Assignment]) {
    for s in servers.iter_mut() {
        s.current = result.iter().find(|a| a.server == s.name).and_then(|a| a.process_server.clone());
    }
}

fn per_ps(result: &[Assignment], servers: &[ServerLoad]) -> BTreeMap<String, (usize, u64)> {
    let mut out: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for a in result {
        if let Some(p) = &a.process_server {
            let churn = servers.iter().find(|s| s.name == a.server).unwrap().churn_bytes_per_day;
            let e = out.entry(p.clone()).or_default();
            e.0 += 1;
            e.1 += churn;
        }
    }
    out
}

fn find<'a>(result: &'a [Assignment], server: &str) -> &'a Assignment {
    result.iter().find(|a| a.server == server).unwrap()
}

#[test]
fn health_follows_thresholds() {
    assert_eq!(health(&report(30.0, 64, 300), now()), Health::Healthy);
    assert_eq!(health(&report(29.5, 0, 0), now()), Health::Warning(vec!["cache free space 29.5% is below 30%".into()]));
    assert_eq!(
        health(&report(24.0, 0, 0), now()),
        Health::Critical(vec!["cache free space 24.0% is below 25%".into()])
    );
    assert_eq!(
        health(&report(80.0, 100, 0), now()),
        Health::Warning(vec!["upload backlog 100.0 GiB is above 64 GiB".into()])
    );
    assert!(health(&report(80.0, 257, 0), now()).is_critical());
    assert_eq!(
        health(&report(80.0, 0, 372), now()),
        Health::Warning(vec!["last heartbeat 6m12s ago is older than 5m".into()])
    );
    // A silent process server is Critical; the stale warning still shows, after it.
    assert_eq!(
        health(&report(28.0, 0, 16 * 60), now()),
        Health::Critical(vec![
            "last heartbeat 16m ago is older than 15m".into(),
            "cache free space 28.0% is below 30%".into(),
        ])
    );
    assert_eq!(health(&report(80.0, 0, -120), now()), Health::Healthy, "clock skew is not silence");
    assert!(health(&report(f64::NAN, 0, 0), now()).is_critical());
}

#[test]
fn replicas_cover_count_and_churn_within_bounds() {
    let limits = SizingLimits::default();
    assert_eq!(replicas_needed(0, 0, &limits), 1);
    assert_eq!(replicas_needed(100, TB, &limits), 1);
    assert_eq!(replicas_needed(101, TB, &limits), 2);
    assert_eq!(replicas_needed(10, 5 * TB, &limits), 3);
    assert_eq!(replicas_needed(5000, 0, &limits), 10);
    let unlimited =
        SizingLimits { servers_per_process_server: 0, churn_bytes_per_day_per_process_server: 0, max_replicas: 0 };
    assert_eq!(replicas_needed(5000, 100 * TB, &unlimited), 1);
}

#[test]
fn places_many_servers_evenly() {
    let servers = many(100, |_| 10 * GIB);
    let result = assign(&healthy(&["a", "b", "c", "d"]), &servers, &SizingLimits::default());
    assert!(result.iter().all(|a| a.reason == Assigned));
    assert!(per_ps(&result, &servers).values().all(|&(n, _)| n == 25));

    let servers = many(97, |i| (i as u64 % 13 + 1) * 7 * GIB);
    let result = assign(&healthy(&["a", "b", "c"]), &servers, &SizingLimits::default());
    let churn: Vec<u64> = per_ps(&result, &servers).values().map(|&(_, c)| c).collect();
    let spread = churn.iter().max().unwrap() - churn.iter().min().unwrap();
    assert!(spread <= 13 * 7 * GIB, "churn per process server {churn:?}");
}

#[test]
fn servers_stay_put_across_calls() {
    let mut servers = many(60, |i| (i as u64 + 1) * GIB);
    let first = assign(&healthy(&["a", "b"]), &servers, &SizingLimits::default());
    settle(&mut servers, &first);
    servers.extend(many(70, |_| GIB).into_iter().skip(60));
    // A new process server joins: nobody moves, the newcomers fill it first.
    let second = assign(&healthy(&["a", "b", "c"]), &servers, &SizingLimits::default());
    for a in &second[..60] {
        assert_eq!(a.reason, Kept, "{}", a.server);
        assert_eq!(a.process_server, find(&first, &a.server).process_server);
    }
    assert!(second[60..].iter().all(|a| a.process_server.as_deref() == Some("c") && a.reason == Assigned));
}

#[test]
fn pins_are_honoured_or_explained() {
    let limits = SizingLimits { servers_per_process_server: 1, ..SizingLimits::default() };
    let mut servers = vec![srv("x", GIB, Some("a")), srv("y", GIB, None), srv("z", GIB, None), srv("w", GIB, None)];
    servers[0].pinned = Some("b".into());
    servers[1].pinned = Some("b".into());
    servers[2].pinned = Some("gone".into());
    servers[3].pinned = Some("sick".into());
    let pss = vec![
        ps("a", Health::Healthy),
        ps("b", Health::Warning(vec![])),
        ps("sick", Health::Critical(vec!["cache free space 3.0% is below 25%".into()])),
    ];
    let result = assign(&pss, &servers, &limits);
    // Both pins to b hold, even beyond its capacity of one server.
    for name in ["x", "y"] {
        assert_eq!((find(&result, name).process_server.as_deref(), &find(&result, name).reason), (Some("b"), &Pinned));
    }
    let why = |name| match &find(&result, name).reason {
        Unassigned { why } => why.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(why("z"), "pinned process server gone does not exist");
    assert_eq!(why("w"), "pinned process server sick is Critical: cache free space 3.0% is below 25%");
}

#[test]
fn servers_move_off_missing_or_critical_process_servers() {
    let mut servers = many(9, |_| GIB);
    let first = assign(&healthy(&["a", "b", "c"]), &servers, &SizingLimits::default());
    settle(&mut servers, &first);
    let on = |ps: &str| first.iter().filter(|a| a.process_server.as_deref() == Some(ps)).count();
    assert_eq!((on("a"), on("b"), on("c")), (3, 3, 3));

    let pss = vec![
        ps("a", Health::Healthy),
        ps("b", Health::Critical(vec!["last heartbeat 20m ago is older than 15m".into()])),
    ];
    let second = assign(&pss, &servers, &SizingLimits::default());
    assert!(second.iter().all(|a| a.process_server.as_deref() == Some("a")));
    for a in &second {
        match find(&first, &a.server).process_server.as_deref() {
            Some("a") => assert_eq!(a.reason, Kept),
            Some("b") => assert_eq!(
                a.reason,
                Reassigned {
                    from: "b".into(),
                    why: "process server b is Critical: last heartbeat 20m ago is older than 15m".into()
                }
            ),
            _ => assert_eq!(a.reason, Reassigned { from: "c".into(), why: "process server c no longer exists".into() }),
        }
    }
}

#[test]
fn capacity_is_respected() {
    let limits =
        SizingLimits { servers_per_process_server: 3, churn_bytes_per_day_per_process_server: TB, max_replicas: 10 };
    let servers = many(8, |_| GIB);
    let result = assign(&healthy(&["a", "b"]), &servers, &limits);
    assert!(per_ps(&result, &servers).values().all(|&(n, _)| n == 3));
    let unassigned: Vec<_> = result.iter().filter(|a| a.process_server.is_none()).collect();
    assert_eq!(unassigned.len(), 2);
    assert_eq!(
        unassigned[0].reason,
        Unassigned { why: "no process server has room (2 total, 0 Critical, the rest full)".into() }
    );

    // Churn budget: 600 GB + 600 GB does not fit in 1 TB; a server bigger than a whole
    // process server still gets an empty one.
    let servers = vec![srv("big", 3 * TB, None), srv("m1", 600 * GIB, None), srv("m2", 600 * GIB, None)];
    let result = assign(&healthy(&["a", "b", "c"]), &servers, &limits);
    let placed: BTreeMap<_, _> = result.iter().map(|a| (a.server.as_str(), a.process_server.as_deref())).collect();
    assert_eq!(placed, BTreeMap::from([("big", Some("a")), ("m1", Some("b")), ("m2", Some("c"))]));
}

#[test]
fn overfull_process_server_sheds_servers_only_when_they_can_go_somewhere() {
    let limits = SizingLimits { servers_per_process_server: 3, ..SizingLimits::default() };
    let servers: Vec<_> = (0..5).map(|i| srv(&format!("s{i}"), GIB, Some("a"))).collect();
    let result = assign(&healthy(&["a", "b"]), &servers, &limits);
    let reasons: Vec<_> = result.iter().map(|a| (a.process_server.as_deref().unwrap(), a.reason.clone())).collect();
    let moved = Reassigned { from: "a".into(), why: "process server a is over capacity".into() };
    assert_eq!(reasons, vec![("a", Kept), ("a", Kept), ("a", Kept), ("b", moved.clone()), ("b", moved)]);
    // With nowhere to go they stay rather than stop replicating.
    let result = assign(&healthy(&["a"]), &servers, &limits);
    assert!(result.iter().all(|a| a.process_server.as_deref() == Some("a") && a.reason == Kept));
}

#[test]
fn healthy_preferred_over_warning_and_critical_never_chosen() {
    let pss =
        vec![ps("a", Health::Warning(vec!["x".into()])), ps("b", Health::Healthy), ps("c", Health::Critical(vec![]))];
    let mut servers = many(3, |_| GIB);
    servers.push(srv("old", 500 * GIB, Some("b")));
    let result = assign(&pss, &servers, &SizingLimits::default());
    assert!(result.iter().all(|a| a.process_server.as_deref() == Some("b")), "{result:?}");
    let mut lone = many(1, |_| 0);
    lone[0].current = Some("c".into());
    let all_critical = assign(&[ps("c", Health::Critical(vec![]))], &lone, &SizingLimits::default());
    assert_eq!(
        all_critical[0].reason,
        Unassigned { why: "process server c is Critical, and no other process server has room".into() }
    );
    let all_critical = assign(&[ps("c", Health::Critical(vec![]))], &many(1, |_| 0), &SizingLimits::default());
    assert_eq!(all_critical[0].reason, Unassigned { why: "all 1 process servers are Critical".into() });
    assert_eq!(
        assign(&[], &many(1, |_| 0), &SizingLimits::default())[0].reason,
        Unassigned { why: "there are no process servers".into() }
    );
}

#[test]
fn result_does_not_depend_on_input_order() {
    let mut servers = many(40, |i| (i as u64 * 37 % 11) * GIB);
    servers[3].current = Some("b".into());
    servers[7].pinned = Some("c".into());
    let mut pss = healthy(&["a", "b", "c", "d"]);
    let limits = SizingLimits { servers_per_process_server: 12, ..SizingLimits::default() };
    let expected = assign(&pss, &servers, &limits);
    servers.reverse();
    pss.reverse();
    assert_eq!(assign(&pss, &servers, &limits), expected);
    let names: Vec<_> = expected.iter().map(|a| a.server.clone()).collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by server name");
}

#[test]
fn a_consistency_group_is_placed_together() {
    let pss = healthy(&["ps-0", "ps-1", "ps-2"]);
    let in_group = |name: &str, current: Option<&str>| ServerLoad {
        consistency_group: Some("erp".into()),
        ..srv(name, TB / 10, current)
    };
    // New members land together, and the group counts with its summed churn.
    let mut servers = vec![in_group("db", None), in_group("web", None), in_group("app", None), srv("other", TB, None)];
    let result = assign(&pss, &servers, &SizingLimits::default());
    let where_ = |r: &[Assignment], n: &str| find(r, n).process_server.clone().unwrap();
    assert_eq!(where_(&result, "db"), where_(&result, "web"));
    assert_eq!(where_(&result, "db"), where_(&result, "app"));
    assert_ne!(where_(&result, "db"), where_(&result, "other"), "the lighter process server takes the group");
    assert_eq!(find(&result, "db").reason, Assigned);
    assert_eq!(result.iter().map(|a| a.server.as_str()).collect::<Vec<_>>(), ["app", "db", "other", "web"]);
    // A member found elsewhere joins where most of the group is.
    settle(&mut servers, &result);
    let home = where_(&result, "db");
    let away = ["ps-0", "ps-1", "ps-2"].into_iter().find(|p| *p != home).unwrap();
    servers.iter_mut().find(|s| s.name == "web").unwrap().current = Some(away.into());
    let again = assign(&pss, &servers, &SizingLimits::default());
    assert_eq!(where_(&again, "web"), home);
    assert_eq!(
        find(&again, "web").reason,
        Reassigned { from: away.into(), why: format!("consistency group erp replicates to {home}") }
    );
    assert_eq!(find(&again, "db").reason, Kept);
    // A pin of one member moves the whole group.
    servers.iter_mut().find(|s| s.name == "app").unwrap().pinned = Some(away.into());
    let pinned = assign(&pss, &servers, &SizingLimits::default());
    assert!(["db", "web", "app"].iter().all(|n| where_(&pinned, n) == away));
    assert_eq!(find(&pinned, "app").reason, Pinned);
}
