//! The plugin against the real local API server (`hack/cluster.sh up`), without the
//! operator: the tests write status as the operator, agent and process server would,
//! run the built binary and check what it prints and what it writes.

use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use siterecovery_api::{ProtectedServer, RecoveryPlan};
use siterecovery_e2e::{TestNamespace, fixtures, install_crds, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_kubectl-siterecovery");

struct Env {
    client: Client,
    ns: TestNamespace,
}

impl Env {
    async fn new(prefix: &str) -> anyhow::Result<Self> {
        let client = siterecovery_e2e::client().await?;
        install_crds(&client).await?;
        let ns = TestNamespace::create(&client, prefix).await?;
        Ok(Self { client, ns })
    }

    fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), &self.ns.name)
    }

    /// Runs the plugin with `-n <ns>`.
    async fn sr(&self, args: &[&str]) -> anyhow::Result<Output> {
        let out = tokio::process::Command::new(BIN).args(args).args(["-n", &self.ns.name]).output().await?;
        Ok(out)
    }

    async fn server(&self, name: &str) -> anyhow::Result<()> {
        self.api::<ProtectedServer>().create(&PostParams::default(), &fixtures::server(name)).await?;
        Ok(())
    }

    async fn plan(&self) -> anyhow::Result<()> {
        let plan: RecoveryPlan = serde_json::from_value(json!({
            "apiVersion": "siterecovery.io/v1alpha1", "kind": "RecoveryPlan",
            "metadata": {"name": "drill"},
            "spec": {"groups": [
                {"name": "database", "servers": ["db-01"],
                 "actions": [{"name": "dba-sign-off", "when": "After",
                              "manualApproval": {"instructions": "check the database"}}]},
                {"name": "app", "servers": ["app-01"]}
            ]}
        }))?;
        self.api::<RecoveryPlan>().create(&PostParams::default(), &plan).await?;
        Ok(())
    }

    /// Writes the plan's status as the operator would (merge patch on the subresource).
    async fn plan_status(&self, status: Value) -> anyhow::Result<()> {
        let patch = json!({"status": status});
        self.api::<RecoveryPlan>().patch_status("drill", &PatchParams::default(), &Patch::Merge(&patch)).await?;
        Ok(())
    }

    async fn get_plan(&self) -> anyhow::Result<RecoveryPlan> {
        Ok(self.api::<RecoveryPlan>().get("drill").await?)
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> anyhow::Result<String> {
    ensure!(o.status.success(), "exit {:?}\nstdout:\n{}\nstderr:\n{}", o.status.code(), stdout(o), stderr(o));
    Ok(stdout(o))
}

fn condition(t: &str, status: &str, message: &str) -> Value {
    json!({"type": t, "status": status, "reason": "Test", "message": message, "lastTransitionTime": fixtures::ago(60)})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_servers_plans_and_their_runs() -> anyhow::Result<()> {
    let env = Env::new("cli-status").await?;
    env.server("db-01").await?;
    env.server("app-01").await?;
    let servers = env.api::<ProtectedServer>();
    fixtures::report_protected(&servers, "db-01").await?;
    use siterecovery_api::field_manager::OPERATOR;
    fixtures::report(
        &servers,
        "db-01",
        OPERATOR,
        json!({"phase": "Protected", "currentRpo": "7s", "conditions": [condition("Ready", "True", "protected")]}),
    )
    .await?;
    fixtures::report(&servers, "db-01", "siterecovery-operator-assignment", json!({"processServer": "ps-0"})).await?;
    fixtures::report(
        &servers,
        "app-01",
        OPERATOR,
        json!({"phase": "InitialReplication",
               "conditions": [condition("Ready", "False", "initial copy 40%"), condition("Stalled", "False", "")]}),
    )
    .await?;
    fixtures::report(
        &servers,
        "app-01",
        siterecovery_api::field_manager::AGENT,
        json!({"initialSync": {"bytesTotal": 1000, "bytesDone": 400, "percent": "40%"}}),
    )
    .await?;
    env.plan().await?;
    env.plan_status(json!({
        "observedGeneration": 1,
        "operation": {"type": "TestFailover", "runId": "t1", "state": "Running", "currentGroup": "database",
                      "progress": "0/2", "message": "TestFailover t1: 0/2 servers done"},
        "groups": [{"name": "database", "state": "Running",
                    "servers": [{"name": "db-01", "state": "Running", "phase": "Protected", "message": "restoring"}]},
                   {"name": "app", "state": "Pending", "servers": [{"name": "app-01", "state": "Pending"}]}]
    }))
    .await?;

    let out = ok(&env.sr(&["status"]).await?)?;
    let line = |name: &str| out.lines().find(|l| l.starts_with(&format!("{name} "))).map(str::to_owned);
    let db = line("db-01").with_context(|| format!("no db-01 row in\n{out}"))?;
    for cell in ["Protected", "7s", "cc-1 (", "ps-0", "100%"] {
        ensure!(db.contains(cell), "db-01 row lacks {cell:?}: {db}\n{out}");
    }
    let app = line("app-01").with_context(|| format!("no app-01 row in\n{out}"))?;
    ensure!(app.contains("InitialReplication") && app.contains("40%") && app.contains("initial copy 40%"), "{app}");
    let drill = line("drill").with_context(|| format!("no plan row in\n{out}"))?;
    for cell in ["TestFailover", "t1", "Running", "database", "0/2"] {
        ensure!(drill.contains(cell), "plan row lacks {cell:?}: {drill}");
    }
    ensure!(out.contains("NAME     PHASE") && out.contains("OPERATION"), "headers:\n{out}");

    // One plan in detail: its groups, then its servers.
    let out = ok(&env.sr(&["status", "drill"]).await?)?;
    ensure!(out.contains("database   db-01") && out.contains("restoring"), "plan detail:\n{out}");
    ensure!(out.contains("app-01") && out.contains("Pending"), "plan detail:\n{out}");

    // One server in detail.
    let out = ok(&env.sr(&["status", "db-01"]).await?)?;
    ensure!(out.contains("crash-consistent  cc-1") && out.contains("Ready"), "server detail:\n{out}");

    // JSON and YAML carry the status.
    let doc: Value = serde_json::from_str(&ok(&env.sr(&["status", "-o", "json"]).await?)?)?;
    let db = doc.as_array().unwrap().iter().find(|d| d["name"] == "db-01").context("db-01 in JSON")?;
    ensure!(db["kind"] == "ProtectedServer" && db["status"]["currentRpo"] == "7s", "{db}");
    let yaml = ok(&env.sr(&["status", "drill", "-o", "yaml"]).await?)?;
    ensure!(yaml.contains("kind: RecoveryPlan") && yaml.contains("runId: t1"), "{yaml}");

    // Unknown names say where they looked.
    let o = env.sr(&["status", "nope"]).await?;
    ensure!(o.status.code() == Some(1), "exit {:?}", o.status.code());
    ensure!(
        stderr(&o).contains(&format!(
            "no ProtectedServer, RecoveryPlan or FailbackJob named nope in namespace {}",
            env.ns.name
        )),
        "{}",
        stderr(&o)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_set_the_plans_operation_and_approvals_append() -> anyhow::Result<()> {
    let env = Env::new("cli-ops").await?;
    env.plan().await?;

    let out = ok(&env.sr(&["test-failover", "drill", "--point", "latest-app", "--run-id", "t1", "--no-wait"]).await?)?;
    ensure!(out.contains("TestFailover run t1 requested"), "{out}");
    let op = serde_json::to_value(env.get_plan().await?.spec.operation)?;
    ensure!(
        op == json!({"type": "TestFailover", "runId": "t1", "recoveryPoint": {"selector": "LatestAppConsistent"}}),
        "{op}"
    );

    ok(&env.sr(&["approve", "drill", "database/dba-sign-off", "--no-wait"]).await?)?;
    let op = env.get_plan().await?.spec.operation.context("operation")?;
    ensure!(op.approvals == Some(vec!["database/dba-sign-off".to_owned()]), "{op:?}");
    ensure!(op.run_id.as_deref() == Some("t1"), "approve kept the run: {op:?}");

    let o = env.sr(&["approve", "drill", "app/nothing", "--no-wait"]).await?;
    ensure!(!o.status.success(), "a wrong gate is refused");
    ensure!(stderr(&o).contains("its gates are: database/dba-sign-off"), "{}", stderr(&o));

    // A new operation replaces the point and the approvals of the previous run.
    let out = ok(&env.sr(&["failover", "drill", "--planned", "--no-wait"]).await?)?;
    let op = env.get_plan().await?.spec.operation.context("operation")?;
    let run = op.run_id.clone().unwrap_or_default();
    ensure!(run.starts_with("plannedfailover-") && out.contains(&run), "{op:?} / {out}");
    ensure!(op.recovery_point.is_none() && op.approvals.is_none(), "previous run's fields survived: {op:?}");

    let out = ok(&env.sr(&["change-point", "drill", "--at", "2026-03-01T09:30:00Z", "--no-wait"]).await?)?;
    let op = serde_json::to_value(env.get_plan().await?.spec.operation)?;
    ensure!(
        op["type"] == "ChangeRecoveryPoint"
            && op["recoveryPoint"] == json!({"selector": "PointInTime", "pointInTime": "2026-03-01T09:30:00Z"}),
        "{op} / {out}"
    );

    // A running run is not replaced by accident.
    env.plan_status(json!({"observedGeneration": 1,
        "operation": {"type": "ChangeRecoveryPoint", "runId": op["runId"], "state": "Running", "currentGroup": "app"}}))
        .await?;
    let o = env.sr(&["commit", "drill", "--no-wait"]).await?;
    ensure!(!o.status.success() && stderr(&o).contains("--force"), "{}", stderr(&o));
    ok(&env.sr(&["commit", "drill", "--no-wait", "--force"]).await?)?;
    ensure!(env.get_plan().await?.spec.operation.map(|o| format!("{:?}", o.type_)).as_deref() == Some("Commit"));

    // Missing objects are named.
    let o = env.sr(&["test-failover", "nope", "--no-wait"]).await?;
    ensure!(o.status.code() == Some(1), "exit {:?}", o.status.code());
    ensure!(
        stderr(&o).contains(&format!("RecoveryPlan nope not found in namespace {}", env.ns.name)),
        "{}",
        stderr(&o)
    );
    let o = env.sr(&["resync", "nope", "--no-wait"]).await?;
    ensure!(stderr(&o).contains("ProtectedServer nope not found"), "{}", stderr(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_stops_at_a_gate_and_ends_with_the_runs_result() -> anyhow::Result<()> {
    let env = Env::new("cli-wait").await?;
    env.plan().await?;
    let plans = env.api::<RecoveryPlan>();
    let run_is = |id: &'static str| {
        move |p: &RecoveryPlan| p.spec.operation.as_ref().and_then(|o| o.run_id.as_deref()) == Some(id)
    };

    // The run reaches the gate: the command stops there with the approve command, exit 3.
    let child = tokio::process::Command::new(BIN)
        .args(["test-failover", "drill", "--run-id", "w1", "--timeout", "60s", "-n", &env.ns.name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let p = wait_for(&plans, "drill", Duration::from_secs(30), "the run requested", run_is("w1")).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.plan_status(json!({"observedGeneration": p.metadata.generation,
        "operation": {"type": "TestFailover", "runId": "w1", "state": "WaitingForApproval", "currentGroup": "database"},
        "groups": [{"name": "database", "state": "WaitingForApproval",
                    "actions": [{"name": "dba-sign-off", "state": "WaitingForApproval"}]}]}))
        .await?;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    ensure!(o.status.code() == Some(3), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    let want = format!("approve with: kubectl siterecovery approve drill database/dba-sign-off -n {}", env.ns.name);
    ensure!(stdout(&o).contains(&want) && stdout(&o).contains("check the database"), "{}", stdout(&o));
    ensure!(stdout(&o).contains("waiting for the operator to start the run"), "progress lines:\n{}", stdout(&o));

    // Approving follows the same run to its end: Succeeded, exit 0.
    let child = tokio::process::Command::new(BIN)
        .args(["approve", "drill", "database/dba-sign-off", "--timeout", "60s", "-n", &env.ns.name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let p = wait_for(&plans, "drill", Duration::from_secs(30), "the approval", |p: &RecoveryPlan| {
        p.spec.operation.as_ref().and_then(|o| o.approvals.clone()).is_some_and(|a| !a.is_empty())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.plan_status(json!({"observedGeneration": p.metadata.generation,
        "operation": {"type": "TestFailover", "runId": "w1", "state": "Succeeded", "progress": "2/2",
                      "message": "TestFailover w1 succeeded for 2/2 servers"},
        "groups": [{"name": "database", "state": "Succeeded", "actions": [{"name": "dba-sign-off", "state": "Succeeded"}]}]}))
    .await?;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    ensure!(o.status.code() == Some(0), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    ensure!(stdout(&o).contains("TestFailover w1 of RecoveryPlan drill succeeded"), "{}", stdout(&o));

    // A failed run: exit 1 naming the server.
    let child = tokio::process::Command::new(BIN)
        .args(["cleanup", "drill", "--run-id", "c1", "--timeout", "60s", "-n", &env.ns.name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let p = wait_for(&plans, "drill", Duration::from_secs(30), "the cleanup", run_is("c1")).await?;
    env.plan_status(json!({"observedGeneration": p.metadata.generation,
        "operation": {"type": "TestFailoverCleanup", "runId": "c1", "state": "Failed", "message": "1 failed"},
        "groups": [{"name": "database", "state": "Failed",
                    "servers": [{"name": "db-01", "state": "Failed", "message": "cannot remove /srv/x"}]}]}))
        .await?;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    ensure!(o.status.code() == Some(1), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    ensure!(stdout(&o).contains("database/db-01: cannot remove /srv/x"), "{}", stdout(&o));

    // Nobody answers: exit 2 after --timeout.
    let o = env.sr(&["commit", "drill", "--run-id", "k1", "--timeout", "2s"]).await?;
    ensure!(o.status.code() == Some(2), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    ensure!(stdout(&o).contains("timed out after 2s"), "{}", stdout(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_sets_a_new_token() -> anyhow::Result<()> {
    let env = Env::new("cli-resync").await?;
    env.server("db-01").await?;
    ok(&env.sr(&["resync", "db-01", "--token", "ticket-42", "--no-wait"]).await?)?;
    let s = env.api::<ProtectedServer>().get("db-01").await?;
    ensure!(s.spec.resync_token.as_deref() == Some("ticket-42"), "{:?}", s.spec.resync_token);
    let o = env.sr(&["resync", "db-01", "--token", "ticket-42", "--no-wait"]).await?;
    ensure!(!o.status.success() && stderr(&o).contains("choose another --token"), "{}", stderr(&o));
    ok(&env.sr(&["resync", "db-01", "--no-wait"]).await?)?;
    let s = env.api::<ProtectedServer>().get("db-01").await?;
    ensure!(s.spec.resync_token.as_deref().is_some_and(|t| t.starts_with("manual-")), "{:?}", s.spec.resync_token);

    // With --wait it follows the agent's answer.
    let child = tokio::process::Command::new(BIN)
        .args(["resync", "db-01", "--token", "ticket-43", "--timeout", "60s", "-n", &env.ns.name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let servers = env.api::<ProtectedServer>();
    wait_for(&servers, "db-01", Duration::from_secs(30), "the token", |s: &ProtectedServer| {
        s.spec.resync_token.as_deref() == Some("ticket-43")
    })
    .await?;
    fixtures::report(
        &servers,
        "db-01",
        siterecovery_api::field_manager::AGENT,
        json!({"resync": {"reason": "Manual", "token": "ticket-43", "requestTime": fixtures::ago(5),
                          "completionTime": fixtures::ago(0), "bytesResent": 2048}}),
    )
    .await?;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    ensure!(o.status.code() == Some(0), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    ensure!(stdout(&o).contains("resync of db-01 done: 2.0 KiB re-sent"), "{}", stdout(&o));
    Ok(())
}

fn secret(name: &str, data: &[(&str, &str)]) -> anyhow::Result<Secret> {
    let data: serde_json::Map<String, Value> = data.iter().map(|(k, v)| ((*k).to_owned(), json!(v))).collect();
    Ok(serde_json::from_value(json!({"metadata": {"name": name}, "stringData": data}))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_writes_the_token_and_prints_the_agent_command() -> anyhow::Result<()> {
    let env = Env::new("cli-register").await?;
    env.server("db-01").await?;
    let secrets = env.api::<Secret>();
    let ns = env.ns.name.clone();
    let expires = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(24)).to_string();
    let token_secret = secret(
        "sr-bootstrap-db-01-token",
        &[
            ("token", "srbt_0123456789"),
            ("ca.crt", "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"),
            ("namespace", &ns),
            ("server", "db-01"),
            ("expiresAt", &expires),
            ("request.json", r#"{"token":"srbt_0123456789"}"#),
            ("registrationURL", "https://operator.example.com:9444"),
        ],
    )?;
    secrets.create(&PostParams::default(), &token_secret).await?;
    let dir = tempfile::tempdir()?;
    let out_dir = dir.path().join("reg");
    let o = env.sr(&["register", "db-01", "--out", out_dir.to_str().unwrap()]).await?;
    let out = ok(&o)?;
    let token = out_dir.join("token");
    ensure!(std::fs::read_to_string(&token)?.trim() == "srbt_0123456789");
    ensure!(std::fs::metadata(&token)?.permissions().mode() & 0o777 == 0o600, "token must be 0600");
    ensure!(std::fs::read_to_string(out_dir.join("ca.crt"))?.contains("BEGIN CERTIFICATE"));
    ensure!(std::fs::metadata(&out_dir)?.permissions().mode() & 0o777 == 0o700, "dir must be 0700");
    let d = out_dir.canonicalize()?.display().to_string();
    let want = format!(
        "SR_BOOTSTRAP_TOKEN=\"$(cat {d}/token)\" siterecovery-agent register --url https://operator.example.com:9444 \
         --ca {d}/ca.crt --namespace {ns} --server db-01 --hostname db-01.example.com --disk os=/dev/loop0"
    );
    ensure!(out.trim() == want, "stdout:\n{out}\nwanted:\n{want}");
    ensure!(!out.contains("srbt_"), "the token must not be printed");
    let script = std::fs::read_to_string(out_dir.join("register.sh"))?;
    ensure!(script.contains("exec siterecovery-agent register --url https://operator.example.com:9444"), "{script}");

    // Once used, the token Secret is gone: the message says how to get a new one.
    secrets.delete("sr-bootstrap-db-01-token", &Default::default()).await?;
    let state = secret(
        "sr-bootstrap-db-01",
        &[("tokenHash", "sha256:x"), ("used", "true"), ("usedAt", "2026-03-01T09:00:00Z"), ("usedByHostname", "db-01")],
    )?;
    secrets.create(&PostParams::default(), &state).await?;
    let o = env.sr(&["register", "db-01", "--out", out_dir.to_str().unwrap()]).await?;
    ensure!(o.status.code() == Some(1), "exit {:?}", o.status.code());
    ensure!(
        stderr(&o).contains("was already used at 2026-03-01T09:00:00Z by db-01")
            && stderr(&o).contains(&format!("kubectl delete secret sr-bootstrap-db-01 -n {ns}")),
        "{}",
        stderr(&o)
    );

    let o = env.sr(&["register", "nope", "--out", out_dir.to_str().unwrap()]).await?;
    ensure!(stderr(&o).contains(&format!("ProtectedServer nope not found in namespace {ns}")), "{}", stderr(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reprotect_creates_a_failback_job_and_failback_approves_its_cutover() -> anyhow::Result<()> {
    use siterecovery_api::FailbackJob;
    let env = Env::new("cli-failback").await?;
    env.server("db-01").await?;
    env.server("app-01").await?;
    env.plan().await?;
    let out = ok(&env.sr(&["reprotect", "--plan", "drill", "--no-wait"]).await?)?;
    ensure!(out.contains("FailbackJob drill created"), "{out}");
    let jobs = env.api::<FailbackJob>();
    let job = jobs.get("drill").await?;
    let spec = serde_json::to_value(&job.spec)?;
    ensure!(
        spec == json!({"planRef": {"name": "drill"}, "target": {"location": "OriginalLocation"},
                       "cutover": {"mode": "Manual"}, "reEnableReplication": true}),
        "{spec}"
    );
    let o = env.sr(&["reprotect", "--plan", "other", "--name", "drill", "--no-wait"]).await?;
    ensure!(stderr(&o).contains("a job's source cannot change"), "{}", stderr(&o));

    ok(&env.sr(&["failback", "drill", "--no-wait"]).await?)?;
    ensure!(jobs.get("drill").await?.spec.cutover.approved, "cut-over approved");

    let o = env.sr(&["failback", "nope", "--no-wait"]).await?;
    ensure!(stderr(&o).contains("FailbackJob nope not found") && stderr(&o).contains("--plan PLAN"), "{}", stderr(&o));
    let o = env.sr(&["reprotect", "--server", "ghost", "--no-wait"]).await?;
    ensure!(stderr(&o).contains("ProtectedServer ghost not found"), "{}", stderr(&o));

    // Waiting for reprotect ends when reverse replication is in sync.
    let child = tokio::process::Command::new(BIN)
        .args(["reprotect", "--server", "app-01", "--timeout", "60s", "-n", &env.ns.name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let job = wait_for(&jobs, "app-01", Duration::from_secs(30), "the job", |_: &FailbackJob| true).await?;
    let patch = json!({"status": {"observedGeneration": job.metadata.generation, "step": "Reprotect",
                                  "state": "WaitingForApproval", "progress": "1/1"}});
    jobs.patch_status("app-01", &PatchParams::default(), &Patch::Merge(&patch)).await?;
    let o = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    ensure!(o.status.code() == Some(0), "exit {:?}\n{}{}", o.status.code(), stdout(&o), stderr(&o));
    let want = format!("cut over to on-prem with: kubectl siterecovery failback app-01 -n {}", env.ns.name);
    ensure!(stdout(&o).contains(&want), "{}", stdout(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_lists_the_recovery_points_in_the_blob_store() -> anyhow::Result<()> {
    use siterecovery_store::{AzureBlobBackend, DiskSource, Keyring, NewPoint, PointKind, ServerRef, Store};
    if std::env::var_os("SR_AZURITE_ENDPOINT").is_none() {
        eprintln!("skipped: SR_AZURITE_ENDPOINT is not set (hack/azurite.sh up && eval \"$(hack/azurite.sh env)\")");
        return Ok(());
    }
    let env = Env::new("cli-points").await?;
    let ns = env.ns.name.clone();
    let secrets = env.api::<Secret>();
    secrets.create(&PostParams::default(), &fixtures::sas_secret()).await?;
    let key = [7u8; 32];
    let key_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "gold-encryption"},
        "data": {"active": "azE=", "key-k1": k8s_openapi::ByteString(key.to_vec())}
    }))?;
    secrets.create(&PostParams::default(), &key_secret).await?;
    env.api::<siterecovery_api::ReplicationPolicy>().create(&PostParams::default(), &fixtures::policy("gold")).await?;
    env.server("db-01").await?;

    // Before any point: an empty list, said so.
    let backend = AzureBlobBackend::with_sas(&fixtures::azurite_endpoint(), "dr-data", &fixtures::azurite_sas())?;
    backend.ensure_container().await?;
    let o = env.sr(&["points", "db-01"]).await?;
    ensure!(ok(&o)?.is_empty() && stderr(&o).contains("No recovery points of db-01"), "{}", stderr(&o));

    let dir = tempfile::tempdir()?;
    let image = dir.path().join("os.img");
    let mut data = vec![0u8; 3 << 20];
    data[..1 << 20].fill(0xab);
    std::fs::write(&image, &data)?;
    let store = Store::new(
        std::sync::Arc::new(backend),
        Keyring::new("k1", [("k1".to_owned(), key)])?,
        siterecovery_store::StoreOptions::default(),
    )?;
    let written = store
        .write_point(
            &ServerRef::new(ns.as_str(), "db-01")?,
            NewPoint { kind: PointKind::App, group: None, members: vec![], time: jiff::Timestamp::now(), id: None },
            &[DiskSource { id: "os".into(), path: image }],
        )
        .await?;
    let id = written.manifest.id.clone();

    let out = ok(&env.sr(&["points", "db-01"]).await?)?;
    let row = out.lines().find(|l| l.starts_with(&id)).with_context(|| format!("no row for {id} in\n{out}"))?;
    ensure!(row.contains(" app ") && row.contains("3.0 MiB"), "{row}");
    ensure!(out.starts_with("ID"), "{out}");
    let doc: Value = serde_json::from_str(&ok(&env.sr(&["points", "db-01", "-o", "json"]).await?)?)?;
    ensure!(doc[0]["id"] == id.as_str() && doc[0]["sizeBytes"] == 3u64 << 20, "{doc}");

    // Without the key Secret the error names it.
    secrets.delete("gold-encryption", &Default::default()).await?;
    let o = env.sr(&["points", "db-01"]).await?;
    ensure!(stderr(&o).contains("Secret gold-encryption not found"), "{}", stderr(&o));
    Ok(())
}
