//! A dweetpipe cluster over a real `nats-server -js` of the test's own (free port, temporary
//! store): several `dweetpipe run` processes share one sandbox fleet, one PostgreSQL database
//! and one Parquet directory. Members are killed, join, leave and are cut off from NATS, and
//! NATS restarts; afterwards every sink holds each dweet the sandbox accepted exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dweetpipe::cluster::ownership;
use dweetpipe::sandbox::SandboxHandle;
use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet, thing_name};

use crate::common::{KEY, LOCK, OTHER_KEY, OTHER_LOCK, client_for, free_port, thing};
use crate::postgres::{TestDatabase, assert_same, stored};
use crate::worker::{WorkerProcess, big_sandbox, parquet_dweets, sandbox_dweets, write_config};

/// A `nats-server` with JetStream, on a free port, storing into a directory of its own.
pub(crate) struct NatsServer {
    child: Option<std::process::Child>,
    port: u16,
    store: tempfile::TempDir,
}

fn nats_server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("DWEETPIPE_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let candidates = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|dir| Path::new(dir).join("nats-server"))
        .chain(["/usr/sbin/nats-server", "/usr/bin/nats-server"].map(PathBuf::from))
        .collect::<Vec<_>>();
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nats-server was not found: install Debian's package (apt-get install nats-server; \
             .ci/run does) or set DWEETPIPE_NATS_SERVER to the binary"
            )
        })
}

impl NatsServer {
    pub(crate) fn start() -> Self {
        let mut server = NatsServer {
            child: None,
            port: free_port(),
            store: tempfile::tempdir().unwrap(),
        };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.store.path().join("nats.log")).unwrap();
        let child = std::process::Command::new(nats_server_binary())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.store.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default()
    }

    /// Stops the server (SIGTERM, as a service manager would) and starts it again on the same
    /// port and store after `down`.
    pub(crate) fn restart(&mut self, down: Duration) {
        self.stop();
        std::thread::sleep(down);
        self.launch();
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One `dweetpipe run` member, with its metrics port.
struct Member {
    name: String,
    process: WorkerProcess,
    metrics_port: u16,
}

impl Member {
    fn spawn(name: &str, setup: &Setup) -> Member {
        Self::spawn_with(name, setup, "", &[])
    }

    /// A member with more environment (`extra`), logging to `<name><log_suffix>.log`.
    fn spawn_with(name: &str, setup: &Setup, log_suffix: &str, extra: &[(&str, &str)]) -> Member {
        let metrics_port = free_port();
        let listen = format!("127.0.0.1:{metrics_port}");
        let mut env = vec![
            ("TEST_DATABASE_URL", setup.db.url.as_str()),
            ("DWEETPIPE__CLUSTER__MEMBER", name),
            ("DWEETPIPE__METRICS__LISTEN", listen.as_str()),
            ("NODE_KEY", KEY),
            ("OTHER_NODE_KEY", OTHER_KEY),
        ];
        env.extend_from_slice(extra);
        let process = WorkerProcess::spawn(
            &setup.config,
            &env,
            setup.dir.path().join(format!("{name}{log_suffix}.log")),
        );
        Member {
            name: name.to_owned(),
            process,
            metrics_port,
        }
    }

    async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        crate::common::get_text(&url).await
    }

    /// The things this member runs a subscription for.
    async fn running(&self) -> BTreeSet<String> {
        series(&self.metrics().await, "dweetpipe_stream_up")
            .into_iter()
            .map(|(thing, _)| thing)
            .collect()
    }

    async fn value(&self, name: &str) -> f64 {
        value(&self.metrics().await, name)
    }
}

/// `name{thing="…"} value` lines of a scrape.
fn series(text: &str, name: &str) -> Vec<(String, f64)> {
    let prefix = format!("{name}{{thing=\"");
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (thing, value) = rest.split_once("\"} ")?;
            Some((thing.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of every series of `name` (with any labels, or none) in a scrape.
fn value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// What one cluster test runs against.
struct Setup {
    dir: tempfile::TempDir,
    server: SandboxHandle,
    nats: NatsServer,
    db: TestDatabase,
    things: Vec<String>,
    config: PathBuf,
    fleet: Option<tokio::task::JoinHandle<()>>,
}

impl Setup {
    async fn new(label: &str, things: usize, extra: &str) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let server = big_sandbox().await;
        let nats = NatsServer::start();
        let db = TestDatabase::create().await;
        let prefix = format!("{}-", thing(label));
        let names: Vec<String> = (1..=things).map(|i| thing_name(&prefix, i)).collect();
        let entries: Vec<(&str, Option<&str>)> = names.iter().map(|t| (t.as_str(), None)).collect();
        let config = write_config(
            dir.path(),
            &server.base_url(),
            &entries,
            &cluster_sections(
                dir.path(),
                &nats,
                &extra.replace("{dir}", &dir.path().display().to_string()),
            ),
        );
        let fleet_config = FleetConfig {
            things,
            interval: Duration::from_millis(200),
            prefix,
            ..FleetConfig::default()
        };
        let fleet = tokio::spawn({
            let client = client_for(&server);
            async move {
                run_fleet(client, fleet_config, Arc::new(FleetStats::default())).await;
            }
        });
        Setup {
            dir,
            server,
            nats,
            db,
            things: names,
            config,
            fleet: Some(fleet),
        }
    }

    fn parquet(&self) -> PathBuf {
        self.dir.path().join("parquet")
    }

    async fn stop_fleet(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.abort();
            let _ = fleet.await;
        }
    }

    async fn accepted(&self) -> BTreeSet<(String, i64)> {
        sandbox_dweets(&client_for(&self.server), &self.things, None).await
    }

    /// Waits (the fleet stopped) until PostgreSQL holds every dweet the sandbox accepted.
    async fn wait_caught_up(&self, members: &[&Member]) {
        let expected = self.accepted().await;
        let mut connection = self.db.connect().await;
        let deadline = Instant::now() + Duration::from_secs(45);
        loop {
            let rows: BTreeSet<_> = stored(&mut connection).await.into_iter().collect();
            if rows == expected {
                return;
            }
            if Instant::now() > deadline {
                let missing: Vec<_> = expected.difference(&rows).take(5).collect();
                let logs: String = members.iter().map(|m| m.process.log()).collect();
                panic!("PostgreSQL did not catch up; missing {missing:?}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Every sink holds each accepted dweet exactly once: PostgreSQL, and the union of every
    /// member's sealed Parquet files.
    async fn assert_every_sink_exactly_once(&self) -> usize {
        let expected = self.accepted().await;
        let mut connection = self.db.connect().await;
        assert_same(stored(&mut connection).await, &expected);
        let in_parquet = parquet_dweets(&self.parquet());
        let unique: BTreeSet<_> = in_parquet.iter().cloned().collect();
        let repeated = in_parquet.len() - unique.len();
        assert_eq!(repeated, 0, "dweets stored twice in the Parquet union");
        let missing: Vec<_> = expected.difference(&unique).take(5).collect();
        let extra: Vec<_> = unique.difference(&expected).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "Parquet union: missing {missing:?}, extra {extra:?}"
        );
        expected.len()
    }
}

fn cluster_sections(dir: &Path, nats: &NatsServer, extra: &str) -> String {
    format!(
        "[postgres]\nurl_env = \"TEST_DATABASE_URL\"\nspool_dir = \"{}\"\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n[cluster]\nnats_url = \"{}\"\nname = \"test\"\nlease = \"2s\"\n\n{extra}\n",
        dir.join("pg-spool").display(),
        nats.url()
    )
}

/// Waits until `members` run every thing, each on exactly the member the rendezvous hash
/// names among them; returns how long it took.
async fn wait_owned(members: &[&Member], things: &[String], within: Duration) -> Duration {
    let started = Instant::now();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    let expected = ownership::assign(things.iter().map(String::as_str), &names);
    let mut seen = BTreeMap::new();
    loop {
        seen.clear();
        for member in members {
            seen.insert(member.name.clone(), member.running().await);
        }
        let matches = members.iter().all(|m| {
            let wanted: BTreeSet<String> = expected
                .get(m.name.as_str())
                .map(|list| list.iter().map(|t| (*t).to_owned()).collect())
                .unwrap_or_default();
            seen.get(&m.name) == Some(&wanted)
        });
        if matches {
            return started.elapsed();
        }
        if started.elapsed() > within {
            let logs: String = members.iter().map(|m| m.process.log()).collect();
            panic!(
                "ownership did not settle within {within:?}: running {:?}, expected {expected:?}\n{}",
                seen.iter()
                    .map(|(m, s)| (m.clone(), s.len()))
                    .collect::<Vec<_>>(),
                &logs[logs.len().saturating_sub(20_000)..]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn stop(members: Vec<Member>) {
    for member in &members {
        member.process.signal("-TERM");
    }
    for mut member in members {
        let log = member.process.log();
        assert!(
            member.process.wait().await.success(),
            "{}: {log}",
            member.name
        );
    }
}

/// Every message of the output stream, (thing, created ms) in stream order, read with a
/// durable pull consumer as README.md shows.
async fn output_stream(nats: &NatsServer, stream: &str) -> Vec<(String, i64)> {
    use futures_util::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut handle = js.get_stream(stream).await.unwrap();
    let total = handle.info().await.unwrap().state.messages;
    let consumer = handle
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("dashboards".into()),
            filter_subject: "dweetpipe.dweets.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut read = Vec::new();
    while (read.len() as u64) < total {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("the consumer delivers every message")
            .unwrap()
            .unwrap();
        let published: dweetpipe::sink::nats::Published =
            serde_json::from_slice(&message.payload).unwrap();
        let created = dweetpipe::protocol::parse_created(&published.created)
            .unwrap()
            .timestamp_millis();
        read.push((published.thing, created));
        message.ack().await.unwrap();
    }
    read
}

/// Each dweet once, in order per thing.
fn assert_output_exactly_once_in_order(read: &[(String, i64)], expected: &BTreeSet<(String, i64)>) {
    let unique: BTreeSet<_> = read.iter().cloned().collect();
    assert_eq!(read.len(), unique.len(), "a dweet published twice");
    let missing: Vec<_> = expected.difference(&unique).take(5).collect();
    assert!(missing.is_empty(), "not published: {missing:?}");
    let mut newest: BTreeMap<&str, i64> = BTreeMap::new();
    for (thing, created) in read {
        if let Some(before) = newest.insert(thing, *created) {
            assert!(
                before < *created,
                "{thing}: {created} published after {before}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_member_s_things_resume_on_the_others_and_every_sink_holds_each_dweet_once() {
    let mut setup = Setup::new(
        "cl-kill",
        30,
        "[nats]\nstream = \"cluster-kill\"\nspool_dir = \"{dir}/nats-spool\"\n",
    )
    .await;
    let a = Member::spawn("worker-a", &setup);
    let b = Member::spawn("worker-b", &setup);
    let c = Member::spawn("worker-c", &setup);
    wait_owned(&[&a, &b, &c], &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut b = b;
    b.process.signal("-KILL");
    b.process.wait().await;
    let moved = wait_owned(&[&a, &c], &setup.things, Duration::from_secs(20)).await;
    eprintln!(
        "cluster: a killed member's things ran on the others {moved:?} after the kill (lease 2 s)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&a, &c]).await;
    stop(vec![a, c]).await;

    let stored = setup.assert_every_sink_exactly_once().await;
    let read = output_stream(&setup.nats, "cluster-kill").await;
    assert_output_exactly_once_in_order(&read, &setup.accepted().await);
    eprintln!(
        "cluster kill: {stored} dweets, each once in PostgreSQL, the Parquet union and the JetStream output"
    );
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_joins_takes_its_share_and_gives_it_back_when_it_leaves() {
    let mut setup = Setup::new("cl-join", 40, "").await;
    let a = Member::spawn("worker-a", &setup);
    let b = Member::spawn("worker-b", &setup);
    let c = Member::spawn("worker-c", &setup);
    wait_owned(&[&a, &b, &c], &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let d = Member::spawn("worker-d", &setup);
    wait_owned(&[&a, &b, &c, &d], &setup.things, Duration::from_secs(30)).await;
    let taken = d.running().await.len();
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_dweetpipe"))
        .args(["check", "--config", setup.config.to_str().unwrap()])
        .env("TEST_DATABASE_URL", &setup.db.url)
        .env("DWEETPIPE__CLUSTER__MEMBER", "checker")
        .output()
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        printed.contains("cluster: 4 live member(s) (worker-a, worker-b, worker-c, worker-d)"),
        "{printed}"
    );
    assert!(
        printed.contains(&format!("  worker-d: owns {taken} thing(s)")),
        "{printed}"
    );
    assert!(
        (4..=18).contains(&taken),
        "about a quarter of 40 things moved to the newcomer: {taken}"
    );
    let moves_before = a.value("dweetpipe_cluster_ownership_moves_total").await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    d.process.signal("-TERM");
    let mut d = d;
    assert!(d.process.wait().await.success(), "{}", d.process.log());
    let back = wait_owned(&[&a, &b, &c], &setup.things, Duration::from_secs(20)).await;
    eprintln!(
        "cluster: {taken} of 40 things moved to a joining member; back {back:?} after it left"
    );
    assert!(a.value("dweetpipe_cluster_ownership_moves_total").await >= moves_before);
    // The things can settle before `a` has seen the leaver go: when none of the leaver's
    // things falls to `a`, its share is the same with and without it.
    wait_until(
        "worker-a counting three members",
        Duration::from_secs(20),
        || async { a.value("dweetpipe_cluster_members").await == 3.0 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&a, &b, &c]).await;
    stop(vec![a, b, c]).await;
    let stored = setup.assert_every_sink_exactly_once().await;
    eprintln!("cluster join/leave: {stored} dweets, each once in PostgreSQL and the Parquet union");
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_restart_loses_and_repeats_nothing() {
    let mut setup = Setup::new(
        "cl-nats",
        20,
        "[nats]\nstream = \"cluster-restart\"\nspool_dir = \"{dir}/nats-spool\"\n",
    )
    .await;
    let a = Member::spawn("worker-a", &setup);
    let b = Member::spawn("worker-b", &setup);
    wait_owned(&[&a, &b], &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewals = a.value("dweetpipe_cluster_lease_renewals_total").await;

    // Shorter than the lease: the members keep their things meanwhile.
    setup.nats.restart(Duration::from_millis(800));
    tokio::time::sleep(Duration::from_secs(4)).await;
    wait_owned(&[&a, &b], &setup.things, Duration::from_secs(20)).await;
    assert!(
        a.value("dweetpipe_cluster_lease_renewals_total").await > renewals,
        "renewals go on after the restart"
    );
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&a, &b]).await;
    // The output's backlog drains once NATS is back.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let publishes = value(
        &a.metrics().await,
        "dweetpipe_sink_write_duration_seconds_count{sink=\"nats\"}",
    );
    assert!(
        publishes > 0.0,
        "the output's publishes are timed like every sink's writes"
    );
    stop(vec![a, b]).await;
    let stored = setup.assert_every_sink_exactly_once().await;
    let read = output_stream(&setup.nats, "cluster-restart").await;
    assert_output_exactly_once_in_order(&read, &setup.accepted().await);
    eprintln!("cluster NATS restart: {stored} dweets, each once in every sink and the output");
    setup.db.drop_now().await;
}

/// Changes made, and leaders, over `members`.
async fn lifecycle_state(members: &[Member]) -> (f64, f64) {
    let mut total = 0.0;
    let mut leaders = 0.0;
    for member in members {
        let text = member.metrics().await;
        total += changes_made(&text);
        leaders += value(&text, "dweetpipe_cluster_leader");
    }
    (total, leaders)
}

/// Lock and alert changes a member made successfully.
fn changes_made(scrape: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| {
            l.starts_with("dweetpipe_lifecycle_actions_total{") && l.contains("outcome=\"ok\"")
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_reconciles_locks_and_alerts_and_each_change_is_made_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = crate::common::sandbox().await;
    let nats = NatsServer::start();
    let db = TestDatabase::create().await;
    let first = thing("cl-life-a");
    let second = thing("cl-life-b");
    let mut text = format!(
        "[source]\nurl = \"{}\"\nstart_spread = \"0s\"\n\n[lifecycle]\ninterval = \"1s\"\n\n{}",
        server.base_url(),
        cluster_sections(dir.path(), &nats, "")
    );
    for (name, lock, key_env) in [
        (&first, LOCK, "NODE_KEY"),
        (&second, OTHER_LOCK, "OTHER_NODE_KEY"),
    ] {
        text.push_str(&format!(
            "[[thing]]\nname = \"{name}\"\nkey_env = \"{key_env}\"\nlock = \"{lock}\"\n[thing.alert]\nto = [\"ops@example.com\"]\nwhen = \"if(dweet.t > 40) return 'hot';\"\n\n"
        ));
    }
    let config = dir.path().join("things.toml");
    std::fs::write(&config, text).unwrap();
    let setup = Setup {
        dir,
        server,
        nats,
        db,
        things: vec![first.clone(), second.clone()],
        config,
        fleet: None,
    };
    let members: Vec<Member> = ["worker-a", "worker-b", "worker-c"]
        .iter()
        .map(|name| Member::spawn(name, &setup))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lifecycle_state(&members).await.0 < 4.0 {
        assert!(
            Instant::now() < deadline,
            "the lifecycle was not reconciled: {}",
            members[0].process.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several reconcile rounds later, still the four changes, made by one leader.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (total, leaders) = lifecycle_state(&members).await;
    assert_eq!(total, 4.0, "two locks and two alerts, each set once");
    assert_eq!(leaders, 1.0, "one leader");

    // The leader dies; another takes over and finds nothing to change.
    let mut members = members;
    let mut leader_index = None;
    for (index, member) in members.iter().enumerate() {
        if member.value("dweetpipe_cluster_leader").await == 1.0 {
            leader_index = Some(index);
        }
    }
    let mut leader = members.remove(leader_index.unwrap());
    let made_by_leader = changes_made(&leader.metrics().await);
    leader.process.signal("-KILL");
    leader.process.wait().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, leaders) = lifecycle_state(&members).await;
        if leaders == 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader after the old one died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (after, _) = lifecycle_state(&members).await;
    assert_eq!(
        after + made_by_leader,
        4.0,
        "the new leader made no change: the server already matched"
    );
    let client = client_for(&setup.server);
    assert!(
        client
            .get_alert(&first, &dweetpipe::client::Key::new(KEY))
            .await
            .is_ok()
    );
    stop(members).await;
    setup.db.drop_now().await;
}

async fn readyz(member: &Member) -> (u16, String) {
    let url = format!("http://127.0.0.1:{}/readyz", member.metrics_port);
    match crate::common::http().get(&url).send().await {
        Ok(answer) => (
            answer.status().as_u16(),
            answer.text().await.unwrap_or_default(),
        ),
        Err(error) => (0, error.to_string()),
    }
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} did not happen within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_nats_a_member_owns_nothing_says_so_and_resumes_when_it_returns() {
    let mut setup = Setup::new("cl-away", 6, "").await;
    // NATS is away at start: the member runs, owns nothing, and /readyz says why.
    setup.nats.stop();
    let member = Member::spawn("worker-a", &setup);
    wait_until(
        "a 503 naming the cluster",
        Duration::from_secs(20),
        || async {
            let (status, body) = readyz(&member).await;
            status == 503 && body.contains("cluster: cannot renew")
        },
    )
    .await;
    assert!(member.running().await.is_empty(), "no things without NATS");

    setup.nats.launch();
    wait_owned(&[&member], &setup.things, Duration::from_secs(20)).await;
    wait_until("ready", Duration::from_secs(20), || async {
        readyz(&member).await.0 == 200
    })
    .await;

    // NATS gone for longer than the lease: the member stops its things (another member would
    // take them), then takes them back with a backfill once NATS answers.
    setup.nats.stop();
    wait_until("the things stopped", Duration::from_secs(20), || async {
        member.running().await.is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    setup.nats.launch();
    wait_owned(&[&member], &setup.things, Duration::from_secs(20)).await;
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&member]).await;
    stop(vec![member]).await;
    let stored = setup.assert_every_sink_exactly_once().await;
    eprintln!("cluster without NATS: {stored} dweets, each once after two NATS outages");
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_processes_given_one_member_name_own_nothing_and_say_why() {
    let mut setup = Setup::new("cl-twin", 4, "").await;
    setup.stop_fleet().await;
    // Each its own directories (else the second is refused at its directory lock): only the
    // bucket can tell them apart.
    let twins: Vec<Member> = ["one", "two"]
        .iter()
        .map(|label| {
            let parquet = setup.dir.path().join(format!("parquet-{label}"));
            let spool = setup.dir.path().join(format!("spool-{label}"));
            Member::spawn_with(
                "twin",
                &setup,
                &format!("-{label}"),
                &[
                    ("DWEETPIPE__PARQUET__DIR", parquet.to_str().unwrap()),
                    ("DWEETPIPE__POSTGRES__SPOOL_DIR", spool.to_str().unwrap()),
                ],
            )
        })
        .collect();
    for twin in &twins {
        wait_until(
            "a 503 naming the clash",
            Duration::from_secs(20),
            || async {
                let (status, body) = readyz(twin).await;
                status == 503 && body.contains("another process renews the member name")
            },
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for twin in &twins {
        assert!(twin.running().await.is_empty(), "{}", twin.process.log());
    }
    stop(twins).await;
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn members_with_separate_parquet_directories_together_hold_every_dweet() {
    let mut setup = Setup::new("cl-apart", 12, "").await;
    let spawn_apart = |name: &str| {
        let parquet = setup.dir.path().join(format!("parquet-{name}"));
        Member::spawn_with(
            name,
            &setup,
            "",
            &[("DWEETPIPE__PARQUET__DIR", parquet.to_str().unwrap())],
        )
    };
    let a = spawn_apart("worker-a");
    let b = spawn_apart("worker-b");
    wait_owned(&[&a, &b], &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // b dies; a takes its things into its own directory.
    let mut b = b;
    b.process.signal("-KILL");
    b.process.wait().await;
    wait_owned(&[&a], &setup.things, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&a]).await;
    stop(vec![a]).await;

    let expected = setup.accepted().await;
    let mut connection = setup.db.connect().await;
    assert_same(stored(&mut connection).await, &expected);
    let mut union = BTreeSet::new();
    for name in ["worker-a", "worker-b"] {
        let rows = parquet_dweets(&setup.dir.path().join(format!("parquet-{name}")));
        let unique: BTreeSet<_> = rows.iter().cloned().collect();
        assert_eq!(
            rows.len(),
            unique.len(),
            "{name}'s own directory holds each dweet once"
        );
        union.extend(unique);
    }
    let missing: Vec<_> = expected.difference(&union).take(5).collect();
    assert!(
        missing.is_empty(),
        "every dweet is in some member's directory: missing {missing:?}"
    );
    eprintln!(
        "cluster, separate directories: {} dweets, all in the union, each directory without repeats",
        expected.len()
    );
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_the_leader_compacts_and_prunes_a_shared_dataset_and_each_dweet_stays_once() {
    const DAY: i64 = 24 * 60 * 60 * 1000;
    let mut setup = Setup::new("cl-house", 6, "").await;
    // Older history of two other boards, in the shared directory and in PostgreSQL: five days
    // ago (past the retention) and two days ago (closed: to compact), in two imports, so the
    // older date holds two files.
    let today = dweetpipe::record::now_ms() / DAY * DAY;
    let old_boards = [thing("cl-house-old1"), thing("cl-house-old2")];
    let line = |board: &str, ms: i64| {
        let created = dweetpipe::protocol::format_created(dweetpipe::record::ms_to_datetime(ms));
        format!("{{\"thing\":\"{board}\",\"created\":\"{created}\",\"content\":{{\"t\":{ms}}}}}\n")
    };
    let mut kept = BTreeSet::new();
    for (file, days_ago, minutes) in [("first.jsonl", 5, 0..30), ("second.jsonl", 2, 30..60)] {
        let mut text = String::new();
        for board in &old_boards {
            for minute in minutes.clone() {
                for day in [days_ago, 2] {
                    let ms = today - day * DAY + minute * 60_000;
                    text.push_str(&line(board, ms));
                    if day == 2 {
                        kept.insert((board.clone(), ms));
                    }
                }
            }
        }
        let path = setup.dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let config = setup.dir.path().join("import.toml");
        std::fs::write(
            &config,
            format!(
                "[parquet]\ndir = \"{}\"\n[postgres]\nurl = \"{}\"\n",
                setup.parquet().display(),
                setup.db.url
            ),
        )
        .unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_dweetpipe"))
            .args([
                "import",
                "--config",
                config.to_str().unwrap(),
                path.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let upkeep = [
        ("DWEETPIPE__PARQUET__COMPACT_AFTER", "0s"),
        ("DWEETPIPE__PARQUET__RETENTION", "4d"),
        ("DWEETPIPE__POSTGRES__RETENTION", "4d"),
    ];
    let members: Vec<Member> = ["worker-a", "worker-b", "worker-c"]
        .iter()
        .map(|name| Member::spawn_with(name, &setup, "", &upkeep))
        .collect();
    wait_owned(
        &members.iter().collect::<Vec<_>>(),
        &setup.things,
        Duration::from_secs(30),
    )
    .await;
    let duties = [
        "dweetpipe_parquet_dates_compacted_total",
        "dweetpipe_parquet_dates_retired_total",
        "dweetpipe_retention_partitions_dropped_total",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let doers = loop {
        let mut doers = Vec::new();
        for member in &members {
            let scrape = member.metrics().await;
            let done: Vec<f64> = duties.iter().map(|d| value(&scrape, d)).collect();
            if done.iter().any(|n| *n > 0.0) {
                doers.push((member, done, value(&scrape, "dweetpipe_cluster_leader")));
            }
        }
        if doers
            .iter()
            .any(|(_, done, _)| done.iter().all(|n| *n > 0.0))
        {
            break doers;
        }
        assert!(
            Instant::now() < deadline,
            "no member compacted, retired and pruned: {}",
            members[0].process.log()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(doers.len(), 1, "one member keeps the shared history");
    assert_eq!(doers[0].2, 1.0, "and it is the leader");

    // The live dweets went on meanwhile; every sink holds each once.
    setup.stop_fleet().await;
    let expected = setup.accepted().await;
    let mut connection = setup.db.connect().await;
    let live = |rows: Vec<(String, i64)>| -> Vec<(String, i64)> {
        rows.into_iter()
            .filter(|(thing, _)| setup.things.contains(thing))
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(45);
    while live(stored(&mut connection).await)
        .into_iter()
        .collect::<BTreeSet<_>>()
        != expected
    {
        assert!(Instant::now() < deadline, "PostgreSQL did not catch up");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    stop(members).await;
    let old_in_postgres: BTreeSet<_> = stored(&mut connection)
        .await
        .into_iter()
        .filter(|(thing, _)| old_boards.contains(thing))
        .collect();
    assert_eq!(
        old_in_postgres, kept,
        "PostgreSQL: the old day went, the closed day stayed"
    );
    let union = parquet_dweets(&setup.parquet());
    let unique: BTreeSet<_> = union.iter().cloned().collect();
    assert_eq!(
        union.len(),
        unique.len(),
        "no dweet twice in the Parquet union"
    );
    let old_in_parquet: BTreeSet<_> = unique
        .iter()
        .filter(|(thing, _)| old_boards.contains(thing))
        .cloned()
        .collect();
    assert_eq!(
        old_in_parquet, kept,
        "Parquet: the old date went, the closed one stayed"
    );
    let live_in_parquet: BTreeSet<_> = unique
        .into_iter()
        .filter(|(thing, _)| setup.things.contains(thing))
        .collect();
    assert_eq!(live_in_parquet, expected, "Parquet: every live dweet once");
    let closed = chrono::DateTime::from_timestamp_millis(today - 2 * DAY)
        .unwrap()
        .date_naive();
    for dataset in ["readings", "dweets"] {
        let folder = setup.parquet().join(dataset).join(format!("date={closed}"));
        let files: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(
            files.len(),
            1,
            "{dataset} of {closed} compacted into one: {files:?}"
        );
    }
    setup.db.drop_now().await;
}

/// The things a member exports per-thing series for that it does not stream.
async fn series_not_owned(member: &Member) -> BTreeSet<String> {
    let scrape = member.metrics().await;
    let running = member.running().await;
    [
        "dweetpipe_last_dweet_timestamp_seconds",
        "dweetpipe_stream_up",
    ]
    .iter()
    .flat_map(|name| series(&scrape, name))
    .map(|(thing, _)| thing)
    .filter(|thing| !running.contains(thing))
    .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_member_exports_series_of_things_it_does_not_own_after_restarts_and_a_handover() {
    let mut setup = Setup::new("cl-series", 24, "").await;
    let names = ["worker-a", "worker-b", "worker-c"];
    let first: Vec<Member> = names.iter().map(|n| Member::spawn(n, &setup)).collect();
    wait_owned(
        &first.iter().collect::<Vec<_>>(),
        &setup.things,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop(first).await;
    // Restarted on filled sinks: each starts knowing every thing's newest stored dweet.
    let members: Vec<Member> = names
        .iter()
        .map(|n| Member::spawn_with(n, &setup, "-again", &[]))
        .collect();
    let all: Vec<&Member> = members.iter().collect();
    wait_owned(&all, &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for member in &members {
        assert_eq!(
            series_not_owned(member).await,
            BTreeSet::new(),
            "{} after the restart",
            member.name
        );
        assert!(
            !member.running().await.is_empty(),
            "{} streams its share",
            member.name
        );
    }
    // A newcomer takes a share, reports its streams up, and one of the first three leaves:
    // it marks stopped only what it still streamed, not what the newcomer took from it.
    let mut members = members;
    members.push(Member::spawn("worker-d", &setup));
    wait_owned(
        &members.iter().collect::<Vec<_>>(),
        &setup.things,
        Duration::from_secs(30),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut gone = members.remove(0);
    gone.process.signal("-TERM");
    assert!(gone.process.wait().await.success());
    wait_owned(
        &members.iter().collect::<Vec<_>>(),
        &setup.things,
        Duration::from_secs(20),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for member in &members {
        assert_eq!(
            series_not_owned(member).await,
            BTreeSet::new(),
            "{} after the handover",
            member.name
        );
    }
    // The fleet dashboard's "Streams up" is whole at any member count: the streams summed
    // over members, over the fleet's size (which every member reports in full).
    let dashboard = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/dashboards/fleet-health.json"
    ))
    .unwrap();
    assert!(
        dashboard.contains("sum(dweetpipe_stream_up) / max(dweetpipe_things_configured)"),
        "the panel divides by the fleet's size, not by it once per member"
    );
    let mut up = 0.0;
    let mut configured: f64 = 0.0;
    for member in &members {
        let scrape = member.metrics().await;
        up += value(&scrape, "dweetpipe_stream_up");
        configured = configured.max(value(&scrape, "dweetpipe_things_configured"));
    }
    assert_eq!(up / configured, 1.0, "every stream up, counted once");
    // Every thing runs somewhere, and `things.stream_state` says so once the owners wrote.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut connection = setup.db.connect().await;
    let states: Vec<(String, String)> = sqlx::query_as(
        "SELECT thing, coalesce(stream_state, '') FROM things WHERE thing = ANY($1)",
    )
    .bind(&setup.things)
    .fetch_all(&mut connection)
    .await
    .unwrap();
    let not_up: Vec<&(String, String)> = states.iter().filter(|(_, s)| s != "up").collect();
    assert!(
        not_up.is_empty(),
        "streams marked other than up while their owner runs them: {not_up:?}"
    );
    setup.stop_fleet().await;
    stop(members).await;
    setup.db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_deployments_on_one_nats_server_each_publish_to_their_own_stream() {
    use dweetpipe::record::{Normalized, Record};
    use dweetpipe::sink::nats::{NatsConfig, NatsSink};
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let section = |stream: &str, prefix: &str| {
        let mut config: NatsConfig =
            toml::from_str(&format!("stream = {stream:?}\nsubject_prefix = {prefix:?}")).unwrap();
        config.resolve(|_| None, Some(&nats.url())).unwrap();
        config
    };
    let dweet = |thing: &str| {
        Record::Dweet(Normalized {
            thing: thing.to_owned(),
            created_ms: 1_795_000_000_000,
            created_text: None,
            received_ms: 1_795_000_000_000,
            content: "{}".to_owned(),
            readings: Vec::new(),
        })
    };
    let mut first = NatsSink::open(client.clone(), &section("site1-dweets", "site1.dweets"))
        .await
        .expect("the first deployment's stream opens");
    // JetStream refuses a second stream over the same subjects: with its own prefix it opens.
    let mut second = NatsSink::open(client.clone(), &section("site2-dweets", "site2.dweets"))
        .await
        .expect("a second deployment's stream opens beside the first");
    first.publish(&[&dweet("board-1")]).await.unwrap();
    second.publish(&[&dweet("board-2")]).await.unwrap();
    second.publish(&[&dweet("board-2")]).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for (stream, subject) in [
        ("site1-dweets", "site1.dweets.board-1"),
        ("site2-dweets", "site2.dweets.board-2"),
    ] {
        let mut handle = js.get_stream(stream).await.unwrap();
        assert_eq!(handle.info().await.unwrap().state.messages, 1, "{stream}");
        let last = handle.get_last_raw_message_by_subject(subject).await;
        assert!(last.is_ok(), "{stream} holds {subject}: {last:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_jetstream_refused_inside_a_batch_is_retried_not_skipped() {
    use dweetpipe::sink::nats::NatsConfig;
    use serde_json::json;
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    // The stream exists already, with a message-size limit one dweet exceeds.
    let mut limits = async_nats::jetstream::stream::Config {
        name: "dweetpipe-dweets".to_owned(),
        subjects: vec!["dweetpipe.dweets.>".to_owned()],
        max_message_size: 400,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.create_stream(limits.clone()).await.unwrap();
    let server = big_sandbox().await;
    let client = client_for(&server);
    let name = thing("refused-inside");
    // Waiting before the worker starts: its backfill publishes all three in one batch.
    for content in [
        json!({"n": 1}),
        json!({"n": 2, "pad": "x".repeat(600)}),
        json!({"n": 3}),
    ] {
        client.dweet_for(&name, &content, None).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        crate::worker::test_config(&server.base_url(), std::slice::from_ref(&name), dir.path());
    let mut nats_config: NatsConfig = toml::from_str(&format!(
        "spool_dir = {:?}",
        dir.path().join("nats-spool").display().to_string()
    ))
    .unwrap();
    nats_config.resolve(|_| None, Some(&nats.url())).unwrap();
    config.nats = Some(nats_config);
    let (worker, metrics) = crate::worker::start_worker(config).await;
    crate::worker::wait_for("the refusal", Duration::from_secs(20), || {
        metrics.value("dweetpipe_sink_errors_total", &[("sink", "nats")]) >= 1.0
    })
    .await;
    // Retries meanwhile must neither skip the refused dweet nor repeat the others.
    tokio::time::sleep(Duration::from_secs(2)).await;
    limits.max_message_size = 64 * 1024;
    js.update_stream(&limits).await.unwrap();
    let started = Instant::now();
    loop {
        let mut stream = js.get_stream("dweetpipe-dweets").await.unwrap();
        if stream.info().await.unwrap().state.messages >= 3 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the refused dweet was never published"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    let mut published: Vec<i64> = output_stream(&nats, "dweetpipe-dweets")
        .await
        .into_iter()
        .map(|(_, created)| created)
        .collect();
    published.sort_unstable();
    assert_eq!(published.len(), 3, "each dweet once: {published:?}");
    published.dedup();
    assert_eq!(published.len(), 3, "no repeats");
    server.shutdown().await;
}

/// A TCP relay to a NATS server that can freeze: it stops passing bytes either way but keeps
/// every connection open, as a network partition (not a crash) looks to a client.
struct FreezableRelay {
    port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezableRelay {
    async fn start(target: &str) -> FreezableRelay {
        let target = target.trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = tokio::spawn({
            let frozen = Arc::clone(&frozen);
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                        continue;
                    };
                    let (from_client, to_client) = client.into_split();
                    let (from_server, to_server) = server.into_split();
                    tokio::spawn(relay_bytes(from_client, to_server, Arc::clone(&frozen)));
                    tokio::spawn(relay_bytes(from_server, to_client, Arc::clone(&frozen)));
                }
            }
        });
        FreezableRelay { port, frozen, task }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn freeze(&self, frozen: bool) {
        self.frozen
            .store(frozen, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FreezableRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_bytes(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<std::sync::atomic::AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(read) => read,
        };
        while frozen.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_cut_off_from_nats_abandons_rather_than_seals_and_each_dweet_stays_once() {
    let mut setup = Setup::new(
        "cl-cut",
        12,
        "[nats]\nstream = \"cluster-cut\"\nspool_dir = \"{dir}/nats-spool\"\n",
    )
    .await;
    let relay = FreezableRelay::start(&setup.nats.url()).await;
    let relayed = relay.url();
    let a = Member::spawn_with(
        "worker-a",
        &setup,
        "",
        &[("DWEETPIPE__CLUSTER__NATS_URL", relayed.as_str())],
    );
    let b = Member::spawn("worker-b", &setup);
    wait_owned(&[&a, &b], &setup.things, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Partitioned: worker-a's NATS connections hang (nothing is refused, nothing closes). Its
    // lease lapses and worker-b takes everything over and backfills it; worker-a must have
    // stopped before, and must not seal or publish what it held of those things afterwards.
    relay.freeze(true);
    let cut = Instant::now();
    wait_until(
        "worker-a abandons its things",
        Duration::from_secs(10),
        || async { a.running().await.is_empty() },
    )
    .await;
    let abandoned_after = cut.elapsed();
    wait_owned(&[&b], &setup.things, Duration::from_secs(20)).await;
    eprintln!(
        "partition: worker-a abandoned its things {abandoned_after:?} after the cut, worker-b ran them all by {:?} after it (lease 2 s)",
        cut.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Healed: worker-a rejoins and takes its share back.
    relay.freeze(false);
    wait_owned(&[&a, &b], &setup.things, Duration::from_secs(40)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let forsaken = value(&a.metrics().await, "dweetpipe_sink_records_forsaken_total");
    setup.stop_fleet().await;
    setup.wait_caught_up(&[&a, &b]).await;
    stop(vec![a, b]).await;

    let stored = setup.assert_every_sink_exactly_once().await;
    let read = output_stream(&setup.nats, "cluster-cut").await;
    assert_output_exactly_once_in_order(&read, &setup.accepted().await);
    eprintln!(
        "partition: {stored} dweets, each once in PostgreSQL, the Parquet union and the JetStream output; worker-a forsook {forsaken} records"
    );
    setup.db.drop_now().await;
}
