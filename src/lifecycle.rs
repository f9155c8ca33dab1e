//! Lock and alert lifecycle: makes the server's locks and alerts match things.toml, the way a
//! controller does: observe, compare, act, and observe again later to correct drift.
//!
//! The dweet.io API has no "describe this thing" call, so the observed state is inferred: a
//! keyless read that fails with "locked" means locked; a read with our key that succeeds means
//! our key opens it; `get_alert` with the key gives the alert. A thing is managed only when its
//! entry declares a `lock`, an `[thing.alert]` or `manage = true` (a key alone is for reading);
//! in a managed thing, no `lock` means "unlocked" and no `[thing.alert]` means "no alert", so
//! deleting them from the file removes them on the server. A thing absent from the file, or
//! not managed, is never observed nor touched.
//!
//! `plan` and `apply` run this once from the CLI; `run` keeps a [`Reconciler`] that does it at
//! start, after every reload and every `[lifecycle] interval`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::alert::condition::{ConditionEngine, ConditionError};
use crate::client::{Alert, Client, Error as ClientError, Key};
use crate::settings::Invalid;
use crate::source::ThingConfig;
use crate::telemetry::Metrics;

/// The `[lifecycle]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How often `run` re-checks the server for drift made by hand.
    #[serde(
        default = "default_interval",
        deserialize_with = "crate::settings::duration"
    )]
    pub interval: Duration,
}

fn default_interval() -> Duration {
    Duration::from_secs(300)
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            interval: default_interval(),
        }
    }
}

impl LifecycleConfig {
    /// Checks values; keys in the error are relative to `[lifecycle]`.
    pub fn validate(&self) -> Result<(), Invalid> {
        if self.interval < Duration::from_secs(1) {
            return Err(Invalid::new(
                "interval",
                "must be at least 1s (the public service allowed one request per second per thing)",
                "see the [lifecycle] section of config/things.example.toml",
            ));
        }
        Ok(())
    }
}

/// A thing's lock as far as the API lets us see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockState {
    Unlocked,
    /// Locked, and our key opens it.
    OpenedByOurKey,
    /// Locked, and our key does not open it.
    LockedAgainstUs,
}

/// What the server has for one thing.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub lock: LockState,
    pub alert: Option<Alert>,
}

/// One change to make on the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActionKind {
    Lock,
    Unlock,
    SetAlert,
    ReplaceAlert,
    RemoveAlert,
}

impl ActionKind {
    /// The `kind` label of `dweetpipe_lifecycle_actions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Lock => "lock",
            ActionKind::Unlock => "unlock",
            ActionKind::SetAlert => "set_alert",
            ActionKind::ReplaceAlert => "replace_alert",
            ActionKind::RemoveAlert => "remove_alert",
        }
    }
}

/// What `plan` found for one thing.
#[derive(Debug, Clone, PartialEq)]
pub enum ThingPlan {
    InSync,
    /// Changes to make, in order.
    Changes(Vec<ActionKind>),
    /// Nothing dweetpipe may do: why.
    NotManaged(&'static str),
    /// Cannot be reconciled (wrong key, server unreachable): why, for a human.
    Problem(String),
}

/// The plan for every thing of the file, in file order.
#[derive(Debug, Clone)]
pub struct Plan {
    pub things: Vec<(ThingConfig, ThingPlan)>,
}

impl Plan {
    pub fn changes(&self) -> usize {
        self.things
            .iter()
            .map(|(_, plan)| match plan {
                ThingPlan::Changes(actions) => actions.len(),
                _ => 0,
            })
            .sum()
    }

    pub fn drifted(&self) -> usize {
        self.things
            .iter()
            .filter(|(_, plan)| matches!(plan, ThingPlan::Changes(_)))
            .count()
    }

    pub fn problems(&self) -> usize {
        self.things
            .iter()
            .filter(|(_, plan)| matches!(plan, ThingPlan::Problem(_)))
            .count()
    }
}

/// One change `apply` attempted.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    pub thing: String,
    pub kind: ActionKind,
    /// `Err` holds the server's reason (never a key).
    pub outcome: Result<(), String>,
}

/// Whether a thing is managed, and the state the file asks for.
fn desired(thing: &ThingConfig) -> Result<&Key, &'static str> {
    if !thing.manage {
        return Err("it declares no lock, [thing.alert] or manage = true");
    }
    thing
        .key
        .as_ref()
        .ok_or("no key_env or key_file, so dweetpipe cannot change its lock or alert")
}

/// Checks what a `[[thing]]` entry asks of the lifecycle, as the service would, before
/// anything is sent: a lock with its key, an alert on a locked thing with recipients and a
/// condition that compiles. `written_manage` is `manage` as the file has it (the thing's
/// `manage` is what it resolved to); keys in the error are relative to the thing.
pub fn validate(
    thing: &ThingConfig,
    written_manage: Option<bool>,
    engine: &mut Option<ConditionEngine>,
) -> Result<(), Invalid> {
    let has_key = thing.key.is_some();
    let declared = thing.lock.is_some() || thing.alert.is_some();
    if !thing.manage && declared {
        return Err(Invalid::new(
            "manage",
            "manage = false, yet a lock or an alert is declared".to_owned(),
            "remove `manage = false` to have dweetpipe manage them, or remove them".to_owned(),
        ));
    }
    if written_manage == Some(true) && !has_key {
        return Err(Invalid::new(
            "manage",
            "manage = true, but dweetpipe needs the thing's key to change its lock or alert".to_owned(),
            "add key_env = \"VARIABLE\" (or key_file = \"/run/secrets/...\") holding the lock's master key".to_owned(),
        ));
    }
    if let Some(lock) = &thing.lock {
        if lock.trim().is_empty() || lock.trim() != lock {
            return Err(Invalid::new(
                "lock",
                "the lock id is empty or has surrounding spaces".to_owned(),
                "write the lock id exactly as issued, e.g. lock = \"my-lock\"".to_owned(),
            ));
        }
        if !has_key {
            return Err(Invalid::new(
            "lock",
                "a lock needs its master key, and no key_env or key_file is set".to_owned(),
                "add key_env = \"VARIABLE\" (or key_file = \"/run/secrets/...\") holding the lock's master key".to_owned(),
            ));
        }
    }
    let Some(alert) = &thing.alert else {
        return Ok(());
    };
    if thing.lock.is_none() {
        return Err(Invalid::new(
            "alert",
            "alerts need a locked thing (the service refuses them otherwise)".to_owned(),
            "add lock = \"LOCK-ID\" and its key_env, or remove [thing.alert]".to_owned(),
        ));
    }
    if alert.to.is_empty() {
        return Err(Invalid::new(
            "alert.to",
            "an alert needs at least one recipient".to_owned(),
            "to = [\"ops@example.com\"]".to_owned(),
        ));
    }
    if let Some(bad) = alert
        .to
        .iter()
        .find(|address| !crate::protocol::is_plausible_email(address))
    {
        return Err(Invalid::new(
            "alert.to",
            format!("{bad:?} is not an e-mail address"),
            "write addresses as name@example.com".to_owned(),
        ));
    }
    let engine = match engine {
        Some(engine) => engine,
        None => engine.insert(
            ConditionEngine::new(Default::default())
                .map_err(|e| Invalid::new("alert.when", e.to_string(), ""))?,
        ),
    };
    engine.check(&alert.when).map_err(|error| {
        let fix = match error {
            ConditionError::Empty | ConditionError::TooLong(_) => {
                "shorten it; `dweetpipe alert test` tries a condition on recorded dweets"
            }
            _ => {
                "it is a JavaScript function body over `dweet`, e.g. \"if(dweet.sensors.TemperatureC > 40) return 'too hot';\""
            }
        };
        Invalid::new("alert.when", error.to_string(), fix)
    })?;
    Ok(())
}

/// The changes that take `observed` to what `thing` declares. Pure, so every case is tested.
pub fn diff(thing: &ThingConfig, observed: &Observed) -> ThingPlan {
    let from = thing.key_source.as_deref().unwrap_or("the configured key");
    let mut actions = Vec::new();
    match (&thing.lock, observed.lock) {
        (_, LockState::LockedAgainstUs) => {
            return ThingPlan::Problem(format!(
                "it is locked, and the key from {from} does not open it: another lock holds it, \
                 or the key is not the master key of its lock"
            ));
        }
        (Some(_), LockState::Unlocked) => {
            actions.push(ActionKind::Lock);
            if thing.alert.is_some() {
                actions.push(ActionKind::SetAlert);
            }
        }
        (Some(_), LockState::OpenedByOurKey) => match (&thing.alert, &observed.alert) {
            (Some(wanted), Some(actual)) if !wanted.matches(actual) => {
                actions.push(ActionKind::ReplaceAlert);
            }
            (Some(_), None) => actions.push(ActionKind::SetAlert),
            (None, Some(_)) => actions.push(ActionKind::RemoveAlert),
            _ => {}
        },
        (None, LockState::OpenedByOurKey) => {
            if observed.alert.is_some() {
                actions.push(ActionKind::RemoveAlert);
            }
            actions.push(ActionKind::Unlock);
        }
        (None, LockState::Unlocked) => {}
    }
    if actions.is_empty() {
        ThingPlan::InSync
    } else {
        ThingPlan::Changes(actions)
    }
}

/// Reads what the server has for `thing`.
pub async fn observe(client: &Client, thing: &str, key: &Key) -> Result<Observed, ClientError> {
    let lock = match with_retries(|| client.get_latest_dweet_for(thing, None)).await {
        Ok(_) | Err(ClientError::NotFound { .. }) => LockState::Unlocked,
        Err(ClientError::Locked { .. } | ClientError::WrongKey { .. }) => {
            match with_retries(|| client.get_latest_dweet_for(thing, Some(key))).await {
                Ok(_) | Err(ClientError::NotFound { .. }) => LockState::OpenedByOurKey,
                Err(ClientError::WrongKey { .. } | ClientError::Locked { .. }) => {
                    LockState::LockedAgainstUs
                }
                Err(error) => return Err(error),
            }
        }
        Err(error) => return Err(error),
    };
    let alert = if lock == LockState::OpenedByOurKey {
        match with_retries(|| client.get_alert(thing, key)).await {
            Ok(alert) => Some(alert),
            Err(ClientError::NotFound { .. }) => None,
            Err(error) => return Err(error),
        }
    } else {
        None
    };
    Ok(Observed { lock, alert })
}

/// Observes every thing of the file and says what `apply` would change. Changes nothing.
pub async fn plan(client: &Client, things: &[ThingConfig]) -> Plan {
    let mut planned = Vec::with_capacity(things.len());
    for thing in things {
        let plan = match desired(thing) {
            Err(why) => ThingPlan::NotManaged(why),
            Ok(key) => match observe(client, &thing.name, key).await {
                Ok(observed) => diff(thing, &observed),
                Err(error) => ThingPlan::Problem(format!("could not read its state: {error}")),
            },
        };
        planned.push((thing.clone(), plan));
    }
    Plan { things: planned }
}

/// Makes the changes of `plan`, in order; after one fails, a thing's remaining changes are
/// not tried (an alert needs its lock) and are reported as such. Counts each change tried in
/// `metrics` when given, and tells `progress` of each as it is done or skipped.
pub async fn apply(
    client: &Client,
    plan: &Plan,
    metrics: Option<&Metrics>,
    mut progress: impl FnMut(&ThingConfig, &Done),
) -> Vec<Done> {
    let mut done = Vec::new();
    for (thing, thing_plan) in &plan.things {
        let (ThingPlan::Changes(actions), Ok(key)) = (thing_plan, desired(thing)) else {
            continue;
        };
        let mut failed_before: Option<ActionKind> = None;
        for &kind in actions {
            if let Some(first) = failed_before {
                let entry = Done {
                    thing: thing.name.clone(),
                    kind,
                    outcome: Err(format!(
                        "not tried, because {} failed before it",
                        describe(thing, first)
                    )),
                };
                progress(thing, &entry);
                done.push(entry);
                continue;
            }
            let outcome = act(client, thing, key, kind)
                .await
                .map_err(|error| error.to_string());
            if let Some(metrics) = metrics {
                metrics.lifecycle_action(&thing.name, kind.as_str(), outcome.is_ok());
            }
            match &outcome {
                Ok(()) => {
                    tracing::info!(thing = %thing.name, kind = kind.as_str(), "lifecycle change made")
                }
                Err(error) => {
                    tracing::warn!(thing = %thing.name, kind = kind.as_str(), %error, "lifecycle change failed")
                }
            }
            let failed = outcome.is_err();
            let entry = Done {
                thing: thing.name.clone(),
                kind,
                outcome,
            };
            progress(thing, &entry);
            done.push(entry);
            if failed {
                failed_before = Some(kind);
            }
        }
    }
    done
}

async fn act(
    client: &Client,
    thing: &ThingConfig,
    key: &Key,
    kind: ActionKind,
) -> Result<(), ClientError> {
    let name = thing.name.as_str();
    match kind {
        ActionKind::Lock => {
            let lock = thing.lock.as_deref().unwrap_or_default();
            with_retries(|| client.lock(name, lock, key)).await?;
        }
        ActionKind::Unlock => {
            with_retries(|| client.unlock(name, key)).await?;
        }
        ActionKind::SetAlert | ActionKind::ReplaceAlert => {
            let Some(alert) = &thing.alert else {
                return Ok(());
            };
            let to: Vec<&str> = alert.to.iter().map(String::as_str).collect();
            with_retries(|| client.set_alert(name, &to, &alert.when, key)).await?;
        }
        ActionKind::RemoveAlert => {
            with_retries(|| client.remove_alert(name, key)).await?;
        }
    }
    Ok(())
}

/// Transient failures (rate limits, resets) are retried twice, a second and two apart: a
/// controller that gives up on the first 429 would report drift it could have fixed.
async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ClientError>>,
{
    let mut pause = Duration::from_secs(1);
    for _ in 0..2 {
        match call().await {
            Err(error) if error.is_transient() => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
            other => return other,
        }
    }
    call().await
}

impl fmt::Display for ThingPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ThingPlan::InSync => f.write_str("in sync"),
            ThingPlan::NotManaged(why) => write!(f, "not managed ({why})"),
            ThingPlan::Problem(why) => write!(f, "PROBLEM: {why}"),
            ThingPlan::Changes(actions) => {
                let names: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
                f.write_str(&names.join(", "))
            }
        }
    }
}

/// Describes one change for a human: which lock, which recipients and condition. Never a key.
pub fn describe(thing: &ThingConfig, kind: ActionKind) -> String {
    let alert = || {
        thing.alert.as_ref().map_or_else(String::new, |alert| {
            format!(" to {} when {:?}", alert.to.join(", "), alert.when)
        })
    };
    match kind {
        ActionKind::Lock => format!("lock with {:?}", thing.lock.as_deref().unwrap_or_default()),
        ActionKind::Unlock => "unlock".to_owned(),
        ActionKind::SetAlert => format!("set alert{}", alert()),
        ActionKind::ReplaceAlert => format!("replace alert{}", alert()),
        ActionKind::RemoveAlert => "remove alert".to_owned(),
    }
}

/// `run`'s lifecycle loop: reconciles at start, whenever the things change (a reload), and
/// every `interval`.
pub struct Reconciler {
    things: watch::Sender<Arc<Vec<ThingConfig>>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Reconciler {
    pub fn start(
        client: Client,
        things: Vec<ThingConfig>,
        config: LifecycleConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        let (sender, receiver) = watch::channel(Arc::new(things));
        let stop = CancellationToken::new();
        let task = tokio::spawn(reconcile_forever(
            client,
            receiver,
            config.interval,
            metrics,
            stop.clone(),
        ));
        Reconciler {
            things: sender,
            stop,
            task,
        }
    }

    /// Reconciles `things` now, and from now on.
    pub fn update(&self, things: Vec<ThingConfig>) {
        self.things.send_replace(Arc::new(things));
    }

    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn reconcile_forever(
    client: Client,
    mut things: watch::Receiver<Arc<Vec<ThingConfig>>>,
    interval: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    reconcile_until_stopped(client, &mut things, interval, &metrics, stop).await;
    // What this process no longer reconciles it no longer reports: in a cluster the new
    // leader's gauges are the truth, and a former leader's would be summed beside them.
    metrics.lifecycle_drift.set(0);
    metrics.lifecycle_problems.set(0);
}

async fn reconcile_until_stopped(
    client: Client,
    things: &mut watch::Receiver<Arc<Vec<ThingConfig>>>,
    interval: Duration,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    loop {
        let current = Arc::clone(&things.borrow_and_update());
        let plan = tokio::select! {
            _ = stop.cancelled() => return,
            plan = plan(&client, &current) => plan,
        };
        metrics.lifecycle_drift.set(plan.drifted() as i64);
        metrics.lifecycle_problems.set(plan.problems() as i64);
        for (thing, thing_plan) in &plan.things {
            if let ThingPlan::Problem(why) = thing_plan {
                tracing::warn!(thing = %thing.name, "lifecycle: {why}");
            }
        }
        if plan.changes() > 0 {
            tracing::info!(
                changes = plan.changes(),
                things = plan.drifted(),
                "lifecycle: the server differs from things.toml; correcting"
            );
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = apply(&client, &plan, Some(metrics), |_, _| {}) => {}
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
            changed = things.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::AlertSpec;
    use crate::client::Recipient;

    /// A process that stops reconciling (it lost the leadership) stops reporting: the new
    /// leader's gauges are summed beside whatever it leaves behind.
    #[tokio::test]
    async fn a_stopped_reconciler_reports_no_drift_and_no_problems() {
        let metrics = Arc::new(Metrics::new().unwrap());
        // Nothing listens there: every thing's plan is a problem.
        let client = Client::new("http://127.0.0.1:1").unwrap();
        let reconciler = Reconciler::start(
            client,
            vec![ThingConfig {
                manage: true,
                ..thing(Some("lock"), None)
            }],
            LifecycleConfig {
                interval: Duration::from_millis(50),
            },
            Arc::clone(&metrics),
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while metrics.lifecycle_problems.get() == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the problem was never reported"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        reconciler.stop().await;
        assert_eq!(metrics.lifecycle_problems.get(), 0);
        assert_eq!(metrics.lifecycle_drift.get(), 0);
    }

    fn thing(lock: Option<&str>, alert: Option<(&str, &str)>) -> ThingConfig {
        ThingConfig {
            lock: lock.map(str::to_owned),
            alert: alert.map(|(to, when)| AlertSpec {
                to: vec![to.to_owned()],
                when: when.to_owned(),
            }),
            key: Some(Key::new("k")),
            key_source: Some("env K".to_owned()),
            ..ThingConfig::unlocked("t")
        }
    }

    fn server_alert(to: &str, when: &str) -> Alert {
        Alert {
            thing: "t".to_owned(),
            condition: when.to_owned(),
            is_demo: false,
            recipients: vec![Recipient::email(to)],
            status: None,
        }
    }

    fn observed(lock: LockState, alert: Option<Alert>) -> Observed {
        Observed { lock, alert }
    }

    #[test]
    fn every_direction_is_planned() {
        use ActionKind::*;
        use LockState::*;
        let a = ("a@x.io", "return 1;");
        let cases: Vec<(ThingConfig, Observed, ThingPlan)> = vec![
            (
                thing(Some("l"), None),
                observed(Unlocked, None),
                ThingPlan::Changes(vec![Lock]),
            ),
            (
                thing(Some("l"), Some(a)),
                observed(Unlocked, None),
                ThingPlan::Changes(vec![Lock, SetAlert]),
            ),
            (
                thing(Some("l"), Some(a)),
                observed(OpenedByOurKey, None),
                ThingPlan::Changes(vec![SetAlert]),
            ),
            (
                thing(Some("l"), Some(a)),
                observed(OpenedByOurKey, Some(server_alert("a@x.io", "return 2;"))),
                ThingPlan::Changes(vec![ReplaceAlert]),
            ),
            (
                thing(Some("l"), Some(a)),
                observed(OpenedByOurKey, Some(server_alert("b@x.io", "return 1;"))),
                ThingPlan::Changes(vec![ReplaceAlert]),
            ),
            (
                thing(Some("l"), Some(a)),
                observed(OpenedByOurKey, Some(server_alert("a@x.io", "return 1;"))),
                ThingPlan::InSync,
            ),
            (
                thing(Some("l"), None),
                observed(OpenedByOurKey, Some(server_alert("a@x.io", "return 1;"))),
                ThingPlan::Changes(vec![RemoveAlert]),
            ),
            (
                thing(None, None),
                observed(OpenedByOurKey, Some(server_alert("a@x.io", "return 1;"))),
                ThingPlan::Changes(vec![RemoveAlert, Unlock]),
            ),
            (
                thing(None, None),
                observed(OpenedByOurKey, None),
                ThingPlan::Changes(vec![Unlock]),
            ),
            (
                thing(None, None),
                observed(Unlocked, None),
                ThingPlan::InSync,
            ),
            (
                thing(Some("l"), None),
                observed(OpenedByOurKey, None),
                ThingPlan::InSync,
            ),
        ];
        for (thing, observed, expected) in cases {
            assert_eq!(diff(&thing, &observed), expected, "{thing:?} {observed:?}");
        }
    }

    #[test]
    fn a_lock_our_key_does_not_open_is_a_problem_naming_the_key_source_not_the_key() {
        let plan = diff(
            &thing(Some("l"), None),
            &observed(LockState::LockedAgainstUs, None),
        );
        let ThingPlan::Problem(why) = plan else {
            panic!("expected a problem, got {plan:?}");
        };
        assert!(why.contains("env K") && !why.contains("\"k\""), "{why}");
    }

    #[test]
    fn recipients_match_in_any_order() {
        let spec = AlertSpec {
            to: vec!["b@x.io".to_owned(), "a@x.io".to_owned()],
            when: "c".to_owned(),
        };
        let mut alert = server_alert("a@x.io", "c");
        alert.recipients.push(Recipient::email("b@x.io"));
        assert!(spec.matches(&alert));
    }

    #[test]
    fn things_without_a_key_or_opted_out_are_not_managed() {
        assert!(desired(&ThingConfig::unlocked("t")).is_err());
        let opted_out = ThingConfig {
            manage: false,
            ..thing(None, None)
        };
        assert_eq!(
            desired(&opted_out).unwrap_err(),
            "it declares no lock, [thing.alert] or manage = true"
        );
    }
}
