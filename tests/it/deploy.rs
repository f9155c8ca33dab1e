//! What ships under deploy/ is checked, not just written: the systemd unit verifies, and the
//! worker speaks the notify protocol the unit relies on.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use crate::common::thing;
use crate::worker::{WorkerProcess, big_sandbox, write_config};

const BIN: &str = env!("CARGO_BIN_EXE_dweetpipe");

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/systemd/dweetpipe.service"
    ))
    .unwrap();
    assert!(
        shipped.contains("Type=notify")
            && shipped.contains("WatchdogSec=")
            && shipped.contains("ExecReload=/bin/kill -HUP $MAINPID")
    );
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("dweetpipe.service");
    std::fs::write(&unit, shipped.replace("/usr/local/bin/dweetpipe", BIN)).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("systemd-analyze is needed for this test: apt-get install systemd");
    let complaints = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
}

fn receive(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message.lines().any(|line| line == wanted);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }
    panic!("no {wanted} from the worker; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_tells_systemd_ready_watchdog_and_stopping() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("notify");
    let config = write_config(dir.path(), &server.base_url(), &[(&name, None)], "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ];
    let mut process = WorkerProcess::spawn(&config, &env, dir.path().join("worker.log"));

    let ready = tokio::task::block_in_place(|| receive(&socket, "READY=1"));
    assert!(
        ready
            .iter()
            .any(|m| m.contains("STATUS=ingesting 1 things")),
        "{ready:?}"
    );
    assert!(
        ready.iter().any(|m| m.contains("streams up")),
        "READY says how many streams are up: {ready:?}"
    );
    tokio::task::block_in_place(|| receive(&socket, "WATCHDOG=1"));
    process.signal("-TERM");
    tokio::task::block_in_place(|| receive(&socket, "STOPPING=1"));
    assert!(process.wait().await.success(), "{}", process.log());
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_comes_even_when_every_first_attempt_fails() {
    let dir = tempfile::tempdir().unwrap();
    let name = thing("unreachable");
    let closed = format!("http://127.0.0.1:{}", crate::common::free_port());
    let config = write_config(dir.path(), &closed, &[(&name, None)], "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = [("NOTIFY_SOCKET", socket_path.to_str().unwrap())];
    let mut process = WorkerProcess::spawn(&config, &env, dir.path().join("worker.log"));
    let ready = tokio::task::block_in_place(|| receive(&socket, "READY=1"));
    assert!(
        ready
            .iter()
            .any(|m| m.contains("STATUS=ingesting 1 things, 0 streams up")),
        "{ready:?}"
    );
    process.signal("-TERM");
    assert!(process.wait().await.success(), "{}", process.log());
}

/// Every message the socket gets within `window`.
fn drain(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let until = std::time::Instant::now() + window;
    while std::time::Instant::now() < until {
        if let Ok(n) = socket.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_sink_loop_fails_healthz_by_name_and_stops_the_watchdog() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("stuck");
    let metrics_port = crate::common::free_port();
    let config = write_config(
        dir.path(),
        &server.base_url(),
        &[(&name, None)],
        &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\nstuck_after = \"1s\"\n"),
    );
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
        ("DWEETPIPE_FAULT_STALL", "parquet"),
    ];
    let mut process = WorkerProcess::spawn(&config, &env, dir.path().join("worker.log"));
    let metrics_addr = std::net::SocketAddr::from(([127, 0, 0, 1], metrics_port));
    let started = std::time::Instant::now();
    let said = loop {
        if tokio::net::TcpStream::connect(metrics_addr).await.is_ok() {
            let (head, body) = crate::common::raw_get(metrics_addr, "/healthz").await;
            if head.starts_with("http/1.1 503") {
                break String::from_utf8_lossy(&body).into_owned();
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/healthz never failed: {}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(said.contains("Parquet sink loop has not turned"), "{said}");
    // Pings sent before the loop was found stuck are gone; from now on there are none.
    tokio::task::block_in_place(|| drain(&socket, Duration::from_millis(500)));
    let later = tokio::task::block_in_place(|| drain(&socket, Duration::from_millis(1500)));
    assert!(
        !later.iter().any(|m| m.contains("WATCHDOG=1")),
        "the watchdog is still fed: {later:?}"
    );
    assert!(process.log().contains("not pinging the systemd watchdog"));
    process.signal("-KILL");
    process.wait().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_a_line_and_name_the_thing() {
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let name = thing("jsonlog");
    crate::common::client_for(&server)
        .lock(&name, crate::common::LOCK, &crate::common::key())
        .await
        .unwrap();
    let config = write_config(dir.path(), &server.base_url(), &[(&name, None)], "");
    let mut process = WorkerProcess::spawn(
        &config,
        &[("DWEETPIPE_LOG_FORMAT", "json")],
        dir.path().join("worker.log"),
    );
    crate::worker::wait_for("the locked thing reported", Duration::from_secs(10), || {
        process.log().contains("requires a key")
    })
    .await;
    process.signal("-TERM");
    assert!(process.wait().await.success());
    let lines: Vec<serde_json::Value> = process
        .log()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
        .collect();
    assert!(!lines.is_empty());
    let about_thing = lines
        .iter()
        .find(|line| {
            line["fields"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("requires a key"))
        })
        .expect("the refusal is logged");
    assert_eq!(
        about_thing["fields"]["thing"],
        serde_json::json!(name),
        "{about_thing}"
    );
    assert_eq!(about_thing["level"], "WARN");
    server.shutdown().await;
}

/// The manifests, as JSON by kind (PyYAML comes with kubernetes-validate).
fn k8s_manifests(dir: &str) -> serde_json::Value {
    let script = r#"
import sys, yaml, json, glob
docs = {}
for f in sorted(glob.glob(sys.argv[1] + '/*.yaml')):
    for d in yaml.safe_load_all(open(f)):
        docs[d['kind']] = d
print(json.dumps(docs))
"#;
    let output = std::process::Command::new("python3")
        .args(["-c", script, dir])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The YAML files of `dir`, checked with `kubernetes-validate --strict` (which must pass),
/// and its report.
fn validate_manifests(dir: &str) -> (Vec<std::path::PathBuf>, String) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    let output = std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate is needed for this test: pip install kubernetes-validate (scripts/test installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success() && !report.contains("ERROR"),
        "{report}"
    );
    (files, report)
}

#[test]
fn kubernetes_manifests_validate_and_agree_with_each_other() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s");
    let (files, report) = validate_manifests(dir);
    assert!(files.len() >= 6);
    assert_eq!(
        report.matches(" passed ").count(),
        files.len() - 1,
        "every core resource passed (the ServiceMonitor is a CRD): {report}"
    );

    let docs = k8s_manifests(dir);
    let pod = &docs["Deployment"]["spec"]["template"];
    let pod_labels = &pod["metadata"]["labels"];
    for (key, value) in docs["Service"]["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&pod_labels[key], value, "the Service selects the pods");
    }
    for (key, value) in docs["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(
            &docs["Service"]["metadata"]["labels"][key], value,
            "the ServiceMonitor selects the Service"
        );
    }
    assert_eq!(
        docs["ServiceMonitor"]["spec"]["endpoints"][0]["port"],
        docs["Service"]["spec"]["ports"][0]["name"]
    );
    let container = &pod["spec"]["containers"][0];
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);

    // The ConfigMap's things.toml loads with dweetpipe's own loader, with the Secret's variables.
    let things = docs["ConfigMap"]["data"]["things.toml"].as_str().unwrap();
    let secrets: Vec<String> = docs["Secret"]["stringData"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), things).unwrap();
    let config = dweetpipe::config::Config::load_with_env(file.path(), |name| {
        secrets
            .iter()
            .any(|s| s == name)
            .then(|| "postgres://u@h/d".to_owned())
    })
    .unwrap();
    assert!(dweetpipe::worker::check_runnable(&config).is_ok());
    let port = config.metrics.unwrap().listen.port();
    assert_eq!(
        serde_json::json!(port),
        container["ports"][0]["containerPort"],
        "metrics listen where the probes look"
    );
    assert!(
        config
            .parquet
            .unwrap()
            .dir
            .starts_with(container["volumeMounts"][1]["mountPath"].as_str().unwrap()),
        "Parquet goes to the volume"
    );
}

/// Grafana's PostgreSQL macros as it expands them, for the day up to a minute from now.
fn expand_grafana_sql(sql: &str, thing: &str) -> String {
    let to = dweetpipe::record::now_ms() + 60_000;
    let from = to - 86_400_000;
    crate::grafana::Query {
        from_ms: from,
        to_ms: to,
        interval_ms: crate::grafana::Query::interval_for(from, to, 1000, 0),
        things: &[thing.to_owned()],
    }
    .expand(sql)
}

/// The `dweetpipe_*` metric families a PromQL expression names (histogram series folded).
fn promql_metrics(expr: &str) -> Vec<String> {
    expr.match_indices("dweetpipe_")
        .map(|(start, _)| {
            let name: String = expr[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |name, suffix| {
                    name.strip_suffix(suffix).map(str::to_owned).unwrap_or(name)
                })
        })
        .collect()
}

fn json_file(path: &str) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dashboards_and_alert_rules_match_what_a_running_worker_exports() {
    use dweetpipe::sandbox::simulator::{FleetConfig, FleetStats, run_fleet};
    let db = crate::postgres::TestDatabase::create().await;
    let server = big_sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let things: Vec<String> = (1..=2)
        .map(|i| dweetpipe::sandbox::simulator::thing_name("S5D9-", i))
        .collect();
    let mut config = crate::worker::test_config(&server.base_url(), &things, dir.path());
    config.postgres = Some(db.sink_config());
    // One managed thing, so the lifecycle series exist.
    config.things[0].lock = Some(crate::common::LOCK.to_owned());
    config.things[0].key = Some(crate::common::key());
    config.things[0].manage = true;
    config.lifecycle = Some(Default::default());
    config.metrics = Some(dweetpipe::telemetry::MetricsConfig::new(
        "127.0.0.1:0".parse().unwrap(),
    ));
    let (worker, metrics) = crate::worker::start_worker(config).await;
    crate::worker::wait_streams_up(&metrics, 2).await;
    crate::worker::wait_for("the lock applied", Duration::from_secs(10), || {
        metrics.value("dweetpipe_lifecycle_actions_total", &[("kind", "lock")]) == 1.0
    })
    .await;
    let fleet = FleetConfig {
        things: 2,
        interval: Duration::from_millis(20),
        count: Some(5),
        key: Some(crate::common::key()),
        ..FleetConfig::default()
    };
    run_fleet(
        crate::common::client_for(&server),
        fleet,
        std::sync::Arc::new(FleetStats::default()),
    )
    .await;
    crate::worker::wait_for("10 dweets", Duration::from_secs(10), || {
        crate::worker::received(&metrics) == 10.0
    })
    .await;
    let scrape = reqwest::get(format!("http://{}/metrics", worker.metrics_addr().unwrap()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: std::collections::BTreeSet<&str> = scrape
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();

    // Every metric a PromQL panel or an alert rule names is exported.
    let mut expressions: Vec<String> = Vec::new();
    for panel in json_file("deploy/grafana/dashboards/fleet-health.json")["panels"]
        .as_array()
        .unwrap()
    {
        for target in panel["targets"].as_array().unwrap() {
            expressions.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let rules_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus");
    let rules = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, yaml, json; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))",
            &format!("{rules_dir}/rules.yaml"),
        ])
        .output()
        .unwrap();
    let rules: serde_json::Value =
        serde_json::from_slice(&rules.stdout).expect("rules.yaml is YAML");
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        assert!(
            rule["alert"]
                .as_str()
                .is_some_and(|a| a.starts_with("Dweetpipe")),
            "{rule}"
        );
        assert!(
            ["warning", "critical"].contains(&rule["labels"]["severity"].as_str().unwrap()),
            "{rule}"
        );
        assert!(rule["annotations"]["summary"].is_string(), "{rule}");
        if let Some(wait) = rule["for"].as_str() {
            assert!(humantime::parse_duration(wait).is_ok(), "{rule}");
        }
        expressions.push(rule["expr"].as_str().unwrap().to_owned());
    }
    assert!(expressions.len() >= 15);
    for expr in &expressions {
        for metric in promql_metrics(expr) {
            assert!(
                exported.contains(metric.as_str()),
                "{metric} (in `{expr}`) is not exported; exported: {exported:?}"
            );
        }
    }

    // Every SQL panel and the $thing variable run, with Grafana's macros expanded, and find rows.
    let sensors = json_file("deploy/grafana/dashboards/s5d9-sensors.json");
    let mut connection = db.connect().await;
    let variable = sensors["templating"]["list"][0]["query"].as_str().unwrap();
    let names: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(variable.to_owned()))
        .fetch_all(&mut connection)
        .await
        .unwrap();
    assert_eq!(names, things, "the $thing variable lists the fleet");
    // The rollup panels trail the raw rows by a refresh (seconds): wait for them.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for panel in sensors["panels"].as_array().unwrap() {
        let raw = panel["targets"][0]["rawSql"].as_str().unwrap();
        assert!(raw.contains("$__timeFilter("), "{raw}");
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(expand_grafana_sql(raw, "S5D9-0001")))
                .fetch_all(&mut connection)
                .await
                .unwrap_or_else(|e| panic!("{}: {e}\n{raw}", panel["title"]));
            if !rows.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} shows data",
                panel["title"]
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    drop(connection);
    worker.shutdown(Duration::from_secs(10)).await.unwrap();
    db.drop_now().await;
    server.shutdown().await;
}

/// Every `datasource` object anywhere in a dashboard, as (type, uid).
fn datasources_used(value: &serde_json::Value, found: &mut Vec<(String, String)>) {
    match value {
        serde_json::Value::Object(map) => {
            if let Some(source) = map.get("datasource")
                && let Some(uid) = source.get("uid").and_then(|u| u.as_str())
            {
                let kind = source.get("type").and_then(|t| t.as_str()).unwrap_or("");
                found.push((kind.to_owned(), uid.to_owned()));
            }
            map.values().for_each(|v| datasources_used(v, found));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| datasources_used(v, found)),
        _ => {}
    }
}

#[test]
fn dashboards_name_only_datasources_the_provisioning_defines() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana");
    let provisioning =
        std::fs::read_to_string(root.join("provisioning/datasources/dweetpipe.yaml")).unwrap();
    // (type, uid) of each provisioned data source, read from its `- name:` entry.
    let mut defined = Vec::new();
    for entry in provisioning.split("\n  - name:").skip(1) {
        let field = |key: &str| {
            entry
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        defined.push((field("type:"), field("uid:")));
    }
    assert_eq!(defined.len(), 2, "{defined:?}");
    for dashboard in ["fleet-health.json", "s5d9-sensors.json"] {
        let text = std::fs::read_to_string(root.join("dashboards").join(dashboard)).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut used = Vec::new();
        datasources_used(&json, &mut used);
        assert!(!used.is_empty(), "{dashboard} names data sources");
        for (kind, uid) in used {
            assert!(
                defined
                    .iter()
                    .any(|(k, u)| *u == uid && (kind.is_empty() || *k == kind)),
                "{dashboard} uses {kind} {uid}, which the provisioning does not define: {defined:?}"
            );
        }
    }
}

#[test]
fn the_clustered_kubernetes_variant_validates_and_its_members_share_one_fleet() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/k8s/cluster");
    let (files, report) = validate_manifests(dir);
    assert_eq!(report.matches(" passed ").count(), files.len(), "{report}");

    let docs = k8s_manifests(dir);
    let set = &docs["StatefulSet"]["spec"];
    assert!(set["replicas"].as_u64().unwrap() >= 3, "several members");
    assert_eq!(
        set["updateStrategy"]["type"], "RollingUpdate",
        "no Recreate gap"
    );
    assert_eq!(set["serviceName"], docs["Service"]["metadata"]["name"]);
    let pod = &set["template"];
    for (key, value) in docs["Service"]["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod["metadata"]["labels"][key], value,
            "the Service selects the members"
        );
    }
    let container = &pod["spec"]["containers"][0];
    let member = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "DWEETPIPE__CLUSTER__MEMBER")
        .expect("each member is named after its pod");
    assert_eq!(
        member["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        docs["PersistentVolumeClaim"]["spec"]["accessModes"][0], "ReadWriteMany",
        "the dataset is shared"
    );

    // The ConfigMap loads as one member would load it, addresses from the Secret.
    let things = docs["ConfigMap"]["data"]["things.toml"].as_str().unwrap();
    let secrets = docs["Secret"]["stringData"].clone();
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(
        file.path(),
        things.replace("lease = ", "member = \"dweetpipe-0\"\nlease = "),
    )
    .unwrap();
    let config = dweetpipe::config::Config::load_with_env(file.path(), |name| {
        secrets[name].as_str().map(str::to_owned)
    })
    .unwrap();
    assert!(dweetpipe::worker::check_runnable(&config).is_ok());
    let cluster = config.cluster.expect("a [cluster] section");
    assert_eq!(cluster.nats_url.as_deref(), secrets["NATS_URL"].as_str());
    assert_eq!(
        config.nats.unwrap().url,
        cluster.nats_url,
        "the output uses the cluster's NATS"
    );
    let mounts = container["volumeMounts"].as_array().unwrap();
    let mount_of = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["mountPath"].as_str())
            .unwrap()
            .to_owned()
    };
    let parquet = config.parquet.unwrap();
    assert!(
        parquet.dir.starts_with(mount_of("dataset")),
        "Parquet on the shared volume"
    );
    assert!(
        parquet.spool_dir().starts_with(mount_of("spool")),
        "spools on the member's own volume"
    );
    assert!(
        config
            .postgres
            .unwrap()
            .spool_dir
            .starts_with(mount_of("spool"))
    );
    assert_eq!(
        serde_json::json!(config.metrics.unwrap().listen.port()),
        container["ports"][0]["containerPort"]
    );
}
