//! What `/healthz` (alive: every loop turns) and `/readyz` (ready: every thing streams and
//! every sink writes) answer from, and the heartbeats the loops give it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Metrics, SinkName};

/// A long-running loop's heartbeat: the loop calls [`LoopBeat::beat`] every turn (and while
/// it waits); `/healthz` and the watchdog fail once it has not for `stuck_after`.
#[derive(Clone)]
pub struct LoopBeat {
    last_ms: Arc<AtomicI64>,
    started: Instant,
}

impl LoopBeat {
    pub fn beat(&self) {
        let ms = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Sleeps `total`, beating every second: a loop that waits on purpose is not stuck.
    pub fn sleep_beating(&self, total: Duration) {
        let until = Instant::now() + total;
        loop {
            self.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_secs(1)));
        }
    }

    /// [`LoopBeat::sleep_beating`] for async loops.
    pub async fn pause_beating(&self, total: Duration) {
        let until = Instant::now() + total;
        loop {
            self.beat();
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
    }
}

/// What `/healthz` and `/readyz` answer from, and the one place that knows each thing's
/// stream state and each sink's trouble (the metrics and `things.stream_state` are fed from
/// here, never read back from the registry).
pub struct Health {
    pub(super) started: Instant,
    /// Each long-running loop's last turn, in ms since `started`.
    loops: Mutex<Vec<(&'static str, Arc<AtomicI64>)>>,
    /// Loops that ended by a panic, with what they said.
    failed_loops: Mutex<Vec<String>>,
    stuck_after: Duration,
    /// Things whose subscription has made its first attempt (for systemd's READY).
    attempted: Mutex<HashSet<String>>,
    /// Sinks that lost records in this run (their spool could not take them).
    sink_losses: Mutex<BTreeMap<SinkName, String>>,
    /// Sinks that cannot make records durable now, with what is wrong.
    sink_problems: Mutex<BTreeMap<SinkName, String>>,
    /// In a cluster: why this member cannot renew its membership (it then owns nothing).
    cluster_problem: Mutex<Option<String>>,
    /// What start-up is doing while it is not done (the endpoints answer from the start).
    starting: Mutex<Option<String>>,
    /// Every running thing: `None` while its stream is up, else since when it is down.
    streams: Mutex<HashMap<String, Option<Instant>>>,
    /// How long a thing may be down before the worker is not ready.
    grace: Duration,
    /// Fed from the stream states above (`stream_up`, a removed thing's series), so the gauge
    /// and the database's `stream_state` say the same.
    metrics: Option<Arc<Metrics>>,
}

impl Health {
    pub fn new(grace: Duration, stuck_after: Duration) -> Self {
        Health {
            started: Instant::now(),
            loops: Mutex::new(Vec::new()),
            failed_loops: Mutex::new(Vec::new()),
            stuck_after,
            attempted: Mutex::new(HashSet::new()),
            sink_losses: Mutex::new(BTreeMap::new()),
            metrics: None,
            sink_problems: Mutex::new(BTreeMap::new()),
            cluster_problem: Mutex::new(None),
            starting: Mutex::new(None),
            streams: Mutex::new(HashMap::new()),
            grace,
        }
    }

    /// Keeps `metrics`' per-thing series in step with the stream states held here.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Registers a long-running loop by name; it must beat from now on.
    pub fn register_loop(&self, name: &'static str) -> LoopBeat {
        let beat = LoopBeat {
            last_ms: Arc::new(AtomicI64::new(0)),
            started: self.started,
        };
        beat.beat();
        lock(&self.loops).push((name, Arc::clone(&beat.last_ms)));
        beat
    }

    /// A loop ended by a panic: alive no more.
    pub fn loop_failed(&self, what: String) {
        lock(&self.failed_loops).push(what);
    }

    /// A sink dropped records its spool could not take (`None`: it has not).
    pub fn set_sink_loss(&self, sink: SinkName, loss: Option<String>) {
        set_or_clear(&self.sink_losses, sink, loss);
    }

    /// `thing`'s subscription has made its first attempt (connected, or failed to).
    pub fn thing_attempted(&self, thing: &str) {
        lock(&self.attempted).insert(thing.to_owned());
    }

    /// Whether every one of `things` has made its first attempt.
    pub fn all_attempted<'a>(&self, mut things: impl Iterator<Item = &'a str>) -> bool {
        let attempted = lock(&self.attempted);
        things.all(|thing| attempted.contains(thing))
    }

    /// A sink reports trouble (`Some(what)`: records wait in its backlog or are dropped) or
    /// that it is writing again (`None`).
    pub fn set_sink_problem(&self, sink: SinkName, problem: Option<String>) {
        set_or_clear(&self.sink_problems, sink, problem);
    }

    /// In a cluster: NATS cannot be reached to renew the membership (`Some(what)`), or can.
    pub fn set_cluster_problem(&self, problem: Option<String>) {
        *lock(&self.cluster_problem) = problem;
    }

    pub fn thing_down(&self, thing: &str) {
        let mut streams = lock(&self.streams);
        let state = streams.entry(thing.to_owned()).or_insert(None);
        if state.is_none() {
            *state = Some(Instant::now());
        }
        if let Some(metrics) = &self.metrics {
            metrics.set_stream_up(thing, false);
        }
    }

    pub fn thing_up(&self, thing: &str) {
        lock(&self.streams).insert(thing.to_owned(), None);
        if let Some(metrics) = &self.metrics {
            metrics.set_stream_up(thing, true);
        }
    }

    /// A thing removed from the configuration: its state and its series go.
    pub fn forget_thing(&self, thing: &str) {
        lock(&self.streams).remove(thing);
        lock(&self.attempted).remove(thing);
        if let Some(metrics) = &self.metrics {
            metrics.forget_thing(thing);
        }
    }

    /// Each running thing and whether its stream is up.
    pub fn stream_states(&self) -> Vec<(String, bool)> {
        lock(&self.streams)
            .iter()
            .map(|(thing, down)| (thing.clone(), down.is_none()))
            .collect()
    }

    /// Alive: every registered loop turned within `stuck_after` and none died. The error
    /// names the loops that did not.
    pub fn liveness(&self) -> Result<(), String> {
        let failed = lock(&self.failed_loops);
        if let Some(first) = failed.first() {
            return Err(first.clone());
        }
        drop(failed);
        let now = i64::try_from(self.started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let limit = i64::try_from(self.stuck_after.as_millis()).unwrap_or(i64::MAX);
        let stuck: Vec<String> = lock(&self.loops)
            .iter()
            .filter_map(|(name, last)| {
                let silent = now - last.load(Ordering::Relaxed);
                (silent > limit).then(|| {
                    format!(
                        "the {name} loop has not turned for {:.1} s",
                        silent as f64 / 1000.0
                    )
                })
            })
            .collect();
        if stuck.is_empty() {
            Ok(())
        } else {
            Err(stuck.join("; "))
        }
    }

    /// Whether `sink` reports that it cannot make records durable now.
    pub fn sink_has_problem(&self, sink: SinkName) -> bool {
        lock(&self.sink_problems).contains_key(&sink)
    }

    /// Start-up is under way (`Some`, what it is doing), or done (`None`).
    pub fn set_starting(&self, what: Option<String>) {
        *lock(&self.starting) = what;
    }

    /// Ready: start-up done, every sink making records durable and every thing up or within
    /// its reconnect grace. The answer names what is not ready.
    pub fn readiness(&self) -> Result<(), String> {
        let mut named: Vec<String> = lock(&self.starting).iter().cloned().collect();
        named.extend(
            lock(&self.sink_problems)
                .iter()
                .chain(lock(&self.sink_losses).iter())
                .map(|(sink, problem)| format!("{}: {problem}", sink.as_str())),
        );
        if let Some(problem) = lock(&self.cluster_problem).as_ref() {
            named.push(format!("cluster: {problem}"));
        }
        if !named.is_empty() {
            return Err(named.join("; "));
        }
        let streams = lock(&self.streams);
        let mut stale: Vec<&str> = streams
            .iter()
            .filter(|(_, down)| down.is_some_and(|since| since.elapsed() > self.grace))
            .map(|(thing, _)| thing.as_str())
            .collect();
        stale.sort_unstable();
        stale.truncate(10);
        if stale.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "streams down beyond the {:?} grace: {}",
                self.grace,
                stale.join(", ")
            ))
        }
    }
}

/// Records what is wrong with `sink` (`Some`), or that nothing is (`None`).
fn set_or_clear(map: &Mutex<BTreeMap<SinkName, String>>, sink: SinkName, what: Option<String>) {
    let mut map = lock(map);
    match what {
        Some(what) => map.insert(sink, what),
        None => map.remove(&sink),
    };
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_names_a_stuck_loop_and_a_dead_one() {
        let health = Health::new(Duration::ZERO, Duration::ZERO);
        assert!(health.liveness().is_ok(), "no loops yet");
        let _beat = health.register_loop("fan-out");
        std::thread::sleep(Duration::from_millis(5));
        assert!(
            health
                .liveness()
                .unwrap_err()
                .contains("the fan-out loop has not turned"),
        );
        let alive = Health::new(Duration::ZERO, Duration::from_secs(30));
        let beat = alive.register_loop("Parquet sink");
        beat.beat();
        assert!(alive.liveness().is_ok());
        alive.loop_failed("the subscription of t panicked".to_owned());
        assert_eq!(
            alive.liveness().unwrap_err(),
            "the subscription of t panicked"
        );
    }

    #[test]
    fn readiness_names_what_is_wrong() {
        let health = Health::new(Duration::ZERO, Duration::from_secs(30));
        assert!(health.readiness().is_ok());
        health.thing_down("S5D9-0001");
        std::thread::sleep(Duration::from_millis(5));
        assert!(health.readiness().unwrap_err().contains("S5D9-0001"));
        health.thing_up("S5D9-0001");
        assert!(health.readiness().is_ok());
        let metrics = Arc::new(Metrics::new().unwrap());
        let fed =
            Health::new(Duration::ZERO, Duration::from_secs(30)).with_metrics(Arc::clone(&metrics));
        fed.thing_down("t");
        assert_eq!(metrics.value("dweetpipe_stream_up", &[("thing", "t")]), 0.0);
        fed.thing_up("t");
        assert_eq!(metrics.value("dweetpipe_stream_up", &[("thing", "t")]), 1.0);
        fed.forget_thing("t");
        assert!(
            !metrics.encode().contains("thing=\"t\""),
            "the series is gone"
        );
        health.set_sink_problem(SinkName::Postgres, Some("unreachable".to_owned()));
        assert_eq!(health.readiness().unwrap_err(), "postgres: unreachable");
        health.set_sink_problem(SinkName::Postgres, None);
        assert!(health.readiness().is_ok());
        health.set_starting(Some("starting: opening the sinks".to_owned()));
        assert_eq!(
            health.readiness().unwrap_err(),
            "starting: opening the sinks"
        );
        health.set_starting(None);
        assert!(health.readiness().is_ok());
        assert_eq!(health.stream_states(), vec![("S5D9-0001".to_owned(), true)]);
    }
}
