//! The sandbox's in-memory state: each thing's recent dweets, its lock, its alert and its
//! listeners, with the protocol's rules (keys, retention, history cap, rate limit) applied here
//! so that the HTTP layer only translates.
//!
//! Things are spread over shards, each behind its own mutex, so writers to different things
//! rarely meet. The lock table is separate and always taken before a shard, never after.
//!
//! Every mutation says what changed as [`Change`]s, which the HTTP layer commits to the
//! store on disk (`disk`) before it answers; `restore` puts what the disk held back. A dweet
//! becomes visible (history, latest, listeners) only once committed: `write` prepares it and
//! `publish` shows it, and a thing's writes take turns through its write gate so they are
//! shown in `created` order.

use std::collections::VecDeque;
use std::collections::hash_map::{Entry, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::{Map, Value};
use tokio::sync::broadcast;

use super::Refusal;
use super::disk::{Change, Loaded};
use super::keys::KeyHash;
use super::notify::{Notification, NotificationKind};
use crate::alert::condition::{Verdict, transition};
use crate::client::{Alert, AlertStatus, Created, Dweet, Key, Recipient};
use crate::protocol;

const SHARDS: usize = 32;
/// Frames a slow listener may fall behind before its stream is ended (it then reconnects and
/// backfills, instead of silently missing dweets).
const LISTENER_BACKLOG: usize = 256;

/// The protocol's tunable limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Dweets kept per thing (`get/dweets` returns at most this many).
    pub max_history: usize,
    /// A thing's history is forgotten this long after its last dweet.
    pub retention: Duration,
    /// Requests per second allowed per thing; `None` for no limit.
    pub rate_limit: Option<f64>,
    /// Alerts that may be sent per thing per day (reported in the alert's status).
    pub alerts_allowed_per_day: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_history: 500,
            retention: Duration::from_secs(24 * 60 * 60),
            rate_limit: None,
            alerts_allowed_per_day: 100,
        }
    }
}

/// One dweet as kept: its compact JSON (without `transaction`), ready to be joined into a read
/// answer without serialising again.
#[derive(Debug, Clone)]
struct Kept {
    json: Arc<str>,
    created_ms: i64,
}

#[derive(Debug)]
struct AlertRecord {
    recipients: Vec<Recipient>,
    condition: Arc<str>,
    status: AlertStatus,
    /// Tells a verdict on this alert from one on the alert it replaced.
    generation: u64,
    /// The newest dweet whose verdict was applied: verdicts may finish out of order.
    evaluated_through: Option<DateTime<Utc>>,
    /// The UTC day `status.alerts_sent_today` counts.
    counting_day: NaiveDate,
    /// Set when the condition overran its time limit so far that its thread was abandoned:
    /// it is not run again until the alert is set anew.
    suspended: bool,
}

/// A dweet written to a thing that carries an alert: what the condition must be run on.
#[derive(Debug, Clone)]
pub struct PendingEvaluation {
    pub condition: Arc<str>,
    /// The dweet's content as compact JSON, the `dweet` the condition sees.
    pub content_json: String,
    generation: u64,
    created_at: DateTime<Utc>,
    created: Created,
}

impl PendingEvaluation {
    /// The evaluated dweet's `created`, in ms.
    pub fn created_ms(&self) -> i64 {
        self.created_at.timestamp_millis()
    }
}

/// What `Store::write` did: the dweet as answered, the alert evaluation it calls for, and
/// what to commit.
#[derive(Debug)]
pub struct Written {
    pub dweet: Dweet,
    pub evaluation: Option<PendingEvaluation>,
    pub change: Change,
}

/// An alert as committed: what survives a restart (a verdict's generation and a suspension
/// do not: the condition runs again on the next dweet).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct AlertRow {
    recipients: Vec<Recipient>,
    condition: String,
    status: AlertStatus,
    /// `YYYY-MM-DD`: the UTC day `status.alerts_sent_today` counts.
    counting_day: String,
}

#[derive(Debug, Default)]
struct Thing {
    /// Newest at the back.
    history: VecDeque<Kept>,
    last_dweet_at: Option<Instant>,
    last_created: Option<DateTime<Utc>>,
    alert: Option<AlertRecord>,
    listeners: Option<broadcast::Sender<Bytes>>,
    bucket: Option<TokenBucket>,
    /// Held from a write's preparation until it is published or refused.
    write_gate: Arc<tokio::sync::Mutex<()>>,
}

impl Thing {
    fn expired(&self, now: Instant, retention: Duration) -> bool {
        self.last_dweet_at
            .is_none_or(|at| now.duration_since(at) >= retention)
    }

    /// Whether the entry holds anything once its history is gone.
    fn is_idle(&self) -> bool {
        self.history.is_empty()
            && self.alert.is_none()
            && Arc::strong_count(&self.write_gate) == 1
            && self
                .listeners
                .as_ref()
                .is_none_or(|tx| tx.receiver_count() == 0)
    }
}

#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let burst = rate.max(1.0);
        let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
struct LockEntry {
    key: KeyHash,
    thing: Option<String>,
}

#[derive(Debug, Default)]
struct LockTable {
    locks: HashMap<String, LockEntry>,
    /// thing -> lock id, the reverse of `LockEntry::thing`.
    locked_things: HashMap<String, String>,
}

impl LockTable {
    /// Whether `key` may use `thing`: always for an unlocked thing.
    fn check_access(&self, thing: &str, key: Option<&str>) -> Result<(), Refusal> {
        let Some(lock) = self.locked_things.get(thing) else {
            return Ok(());
        };
        let entry = self.locks.get(lock);
        match key {
            None => Err(Refusal::locked()),
            Some(key) if entry.is_some_and(|e| e.key.verify(key)) => Ok(()),
            Some(_) => Err(Refusal::wrong_key()),
        }
    }

    /// Like `check_access`, for calls that only make sense on a locked thing; `needing` says
    /// which (the refusal names it).
    fn check_locked_access(
        &self,
        thing: &str,
        key: Option<&str>,
        needing: &str,
    ) -> Result<(), Refusal> {
        if !self.locked_things.contains_key(thing) {
            return Err(Refusal::new(
                400,
                format!("this thing is not locked; {needing} need a locked thing and its key"),
            ));
        }
        self.check_access(thing, key)
    }

    fn lock_with_key(&mut self, lock: &str, key: Option<&str>) -> Result<&mut LockEntry, Refusal> {
        let entry = self.locks.get_mut(lock).ok_or_else(Refusal::not_found)?;
        if !key.is_some_and(|key| entry.key.verify(key)) {
            return Err(Refusal::wrong_key());
        }
        Ok(entry)
    }

    fn row(&self, lock: &str) -> Option<Change> {
        let entry = self.locks.get(lock)?;
        Some(Change::Lock {
            lock: lock.to_owned(),
            row: entry.key.to_row(entry.thing.clone()),
        })
    }
}

pub struct Store {
    shards: Vec<Mutex<HashMap<String, Thing>>>,
    hasher: RandomState,
    locks: RwLock<LockTable>,
    limits: Limits,
    alert_generations: std::sync::atomic::AtomicU64,
}

impl Store {
    pub fn new(limits: Limits, locks: impl IntoIterator<Item = (String, Key)>) -> Self {
        let table = LockTable {
            locks: locks
                .into_iter()
                .map(|(name, key)| {
                    let key = KeyHash::of(key.expose());
                    (name, LockEntry { key, thing: None })
                })
                .collect(),
            locked_things: HashMap::new(),
        };
        Store {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            locks: RwLock::new(table),
            limits,
            alert_generations: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Puts back what the disk held: histories (within retention), locks and where they are
    /// attached (a lock also given at start keeps the key given), and alerts. Returns the
    /// changes that bring the disk in step: every lock as it now stands.
    pub fn restore(&self, loaded: Loaded) -> Vec<Change> {
        let now_utc = Utc::now();
        let now = Instant::now();
        {
            let mut table = self.lock_table_mut();
            for (lock, row) in loaded.locks {
                let Some(hash) = KeyHash::from_row(&row) else {
                    tracing::warn!(%lock, "a stored lock is damaged; it is dropped");
                    continue;
                };
                // A lock given at start keeps the key given; one only on disk comes back.
                table.locks.entry(lock.clone()).or_insert(LockEntry {
                    key: hash,
                    thing: None,
                });
                if let Some(thing) = row.thing
                    && !table.locked_things.contains_key(&thing)
                {
                    if let Some(entry) = table.locks.get_mut(&lock) {
                        entry.thing = Some(thing.clone());
                    }
                    table.locked_things.insert(thing, lock);
                }
            }
        }
        for (thing, history) in loaded.histories {
            let Some(&(newest_ms, _)) = history.last() else {
                continue;
            };
            let age = (now_utc.timestamp_millis() - newest_ms).max(0) as u64;
            let age = Duration::from_millis(age);
            if age >= self.limits.retention {
                continue;
            }
            let mut shard = self.shard(&thing);
            let entry = shard.entry(thing.clone()).or_default();
            let skip = history.len().saturating_sub(self.limits.max_history);
            entry.history = history
                .into_iter()
                .skip(skip)
                .map(|(created_ms, json)| Kept {
                    json: json.into(),
                    created_ms,
                })
                .collect();
            entry.last_dweet_at = Some(now.checked_sub(age).unwrap_or(now));
            entry.last_created = DateTime::from_timestamp_millis(newest_ms);
        }
        for (thing, json) in loaded.alerts {
            let row: AlertRow = match serde_json::from_str(&json) {
                Ok(row) => row,
                Err(error) => {
                    tracing::warn!(%thing, %error, "a stored alert is damaged; it is dropped");
                    continue;
                }
            };
            let record = AlertRecord {
                recipients: row.recipients,
                condition: row.condition.into(),
                status: row.status,
                generation: self
                    .alert_generations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                evaluated_through: None,
                counting_day: NaiveDate::parse_from_str(&row.counting_day, "%Y-%m-%d")
                    .unwrap_or_else(|_| Utc::now().date_naive()),
                suspended: false,
            };
            self.shard(&thing).entry(thing.clone()).or_default().alert = Some(record);
        }
        let table = self.lock_table();
        let mut locks: Vec<&String> = table.locks.keys().collect();
        locks.sort();
        locks
            .into_iter()
            .filter_map(|lock| table.row(lock))
            .collect()
    }

    /// The thing's alert as it now stands, to commit (its removal when it has none).
    pub fn alert_change(&self, thing: &str) -> Change {
        let shard = self.shard(thing);
        let json = shard
            .get(thing)
            .and_then(|entry| entry.alert.as_ref())
            .and_then(|alert| {
                serde_json::to_string(&AlertRow {
                    recipients: alert.recipients.clone(),
                    condition: alert.condition.to_string(),
                    status: alert.status.clone(),
                    counting_day: alert.counting_day.format("%Y-%m-%d").to_string(),
                })
                .ok()
            });
        Change::Alert {
            thing: thing.to_owned(),
            json,
        }
    }

    /// Whether `thing` is locked and `key` opens it (the stored-dweets calls need both).
    pub fn check_stored_access(&self, thing: &str, key: Option<&str>) -> Result<(), Refusal> {
        self.lock_table()
            .check_locked_access(thing, key, "stored dweets and alert events")
    }

    fn shard(&self, thing: &str) -> MutexGuard<'_, HashMap<String, Thing>> {
        let index = (self.hasher.hash_one(thing) as usize) % SHARDS;
        // A panic while holding a shard cannot leave a thing half-written in a way that
        // matters more than taking the whole server down, so a poisoned shard is used as is.
        self.shards[index]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_table(&self) -> std::sync::RwLockReadGuard<'_, LockTable> {
        self.locks.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_table_mut(&self) -> std::sync::RwLockWriteGuard<'_, LockTable> {
        self.locks.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The gate a writer to `thing` holds from [`Store::write`] to [`Store::publish`].
    pub fn write_gate(&self, thing: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut shard = self.shard(thing);
        with_thing(&mut shard, thing, |entry| Arc::clone(&entry.write_gate))
    }

    /// Prepares a dweet: checks access and the rate, gives it its `created`, and says what to
    /// commit. Nothing of it is visible until [`Store::publish`]; the caller holds the
    /// thing's [`Store::write_gate`] across both.
    pub fn write(
        &self,
        thing: &str,
        content: Map<String, Value>,
        key: Option<&str>,
    ) -> Result<Written, Refusal> {
        let locked = {
            let table = self.lock_table();
            table.check_access(thing, key)?;
            table.locked_things.contains_key(thing)
        };
        let now = Instant::now();
        let mut shard = self.shard(thing);
        with_thing(&mut shard, thing, |entry| {
            self.take_token(entry, now)?;
            if entry.expired(now, self.limits.retention) {
                entry.history.clear();
            }
            // Strictly increasing per thing: (thing, created) identifies a dweet downstream, so two
            // dweets in one millisecond must not share it.
            let mut created_at = Utc::now();
            if let Some(last) = entry.last_created {
                let next = last + chrono::Duration::milliseconds(1);
                if created_at < next {
                    created_at = next;
                }
            }
            let created_at = truncate_to_millis(created_at);
            let dweet = Dweet {
                thing: thing.to_owned(),
                created: Created::from_datetime(created_at),
                content: Value::Object(content),
                transaction: None,
            };
            let json: Arc<str> = serde_json::to_string(&dweet)
                .map_err(|e| Refusal::new(500, format!("could not encode the dweet: {e}")))?
                .into();
            let evaluation = match &entry.alert {
                Some(alert) if !alert.suspended => Some(PendingEvaluation {
                    condition: Arc::clone(&alert.condition),
                    content_json: serde_json::to_string(&dweet.content).map_err(|e| {
                        Refusal::new(500, format!("could not encode the dweet: {e}"))
                    })?,
                    generation: alert.generation,
                    created_at,
                    created: dweet.created.clone(),
                }),
                _ => None,
            };
            // The oldest kept dweet's time, less a millisecond: everything up to it goes once this
            // one is kept.
            let evicted_through = (entry.history.len() >= self.limits.max_history).then(|| {
                let evicted = entry.history.len() + 1 - self.limits.max_history;
                let oldest_kept = entry.history.get(evicted);
                oldest_kept.map_or(created_at.timestamp_millis(), |kept| kept.created_ms) - 1
            });
            entry.last_dweet_at = Some(now);
            entry.last_created = Some(created_at);
            let change = Change::Dweet {
                thing: thing.to_owned(),
                created_ms: created_at.timestamp_millis(),
                json,
                evicted_through,
                stored: locked,
            };
            Ok(Written {
                dweet,
                evaluation,
                change,
            })
        })
    }

    /// Shows a committed dweet: kept in the thing's history (the oldest beyond the cap go) and
    /// sent to its listeners.
    pub fn publish(&self, committed: &Change) {
        let Change::Dweet {
            thing,
            created_ms,
            json,
            ..
        } = committed
        else {
            return;
        };
        let mut shard = self.shard(thing);
        with_thing(&mut shard, thing, |entry| {
            if let Some(listeners) = &entry.listeners
                && listeners.receiver_count() > 0
            {
                // An error only means every listener left since the check.
                let _ = listeners.send(Bytes::from(protocol::encode_stream_frame(json)));
            }
            entry.history.push_back(Kept {
                json: Arc::clone(json),
                created_ms: *created_ms,
            });
            while entry.history.len() > self.limits.max_history {
                entry.history.pop_front();
            }
        });
    }

    /// Stops running the alert's condition (the one `evaluated` ran), until it is set anew.
    pub fn suspend_alert(&self, thing: &str, evaluated: &PendingEvaluation) {
        let mut shard = self.shard(thing);
        if let Some(alert) = shard.get_mut(thing).and_then(|entry| entry.alert.as_mut())
            && alert.generation == evaluated.generation
        {
            alert.suspended = true;
        }
    }

    /// Applies a condition's verdict on a dweet to the thing's alert status, and says what to
    /// notify: an alert opens (counted against the day's allowance) or closes. A verdict for
    /// an alert since replaced or removed, or older than one already applied, changes nothing.
    pub fn record_verdict(
        &self,
        thing: &str,
        evaluated: &PendingEvaluation,
        verdict: &Verdict,
    ) -> Option<Notification> {
        let mut shard = self.shard(thing);
        let alert = shard.get_mut(thing)?.alert.as_mut()?;
        if alert.generation != evaluated.generation
            || alert
                .evaluated_through
                .is_some_and(|through| through >= evaluated.created_at)
        {
            return None;
        }
        alert.evaluated_through = Some(evaluated.created_at);
        let today = evaluated.created_at.date_naive();
        if alert.counting_day != today {
            alert.counting_day = today;
            alert.status.alerts_sent_today = 0;
        }
        let status = &mut alert.status;
        if let Verdict::Fired { message } = verdict {
            status.message.clone_from(message);
        }
        let kind = transition(status.open, verdict)?;
        match kind {
            NotificationKind::Opened => {
                status.open = true;
                status.since = Some(evaluated.created.as_str().to_owned());
            }
            NotificationKind::Closed => {
                status.open = false;
                status.message.clear();
                status.since = None;
            }
        }
        let within_allowance = kind == NotificationKind::Closed
            || status.alerts_sent_today < status.alerts_allowed_today;
        if kind == NotificationKind::Opened && within_allowance {
            status.alerts_sent_today += 1;
        }
        Some(Notification {
            thing: thing.to_owned(),
            kind,
            message: match verdict {
                Verdict::Fired { message } => message.clone(),
                Verdict::Quiet => String::new(),
            },
            created: evaluated.created.as_str().to_owned(),
            condition: alert.condition.to_string(),
            recipients: alert.recipients.iter().map(|r| r.address.clone()).collect(),
            within_allowance,
        })
    }

    /// The compact JSON of the kept dweets, newest first, at most `limit`.
    pub fn read(
        &self,
        thing: &str,
        key: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Arc<str>>, Refusal> {
        self.lock_table().check_access(thing, key)?;
        let now = Instant::now();
        let mut shard = self.shard(thing);
        let Some(entry) = shard.get_mut(thing) else {
            return Err(Refusal::not_found());
        };
        self.take_token(entry, now)?;
        if entry.expired(now, self.limits.retention) {
            return Err(Refusal::not_found());
        }
        Ok(entry
            .history
            .iter()
            .rev()
            .take(limit)
            .map(|kept| Arc::clone(&kept.json))
            .collect())
    }

    /// The newest dweet of each unlocked thing that dweeted within `within`, newest first, at
    /// most `limit`: what the fleet page and `/see` show (locked things stay private).
    pub fn recent(&self, limit: usize, within: Duration) -> Vec<Arc<str>> {
        let locked: std::collections::HashSet<String> =
            self.lock_table().locked_things.keys().cloned().collect();
        let now = Instant::now();
        let mut newest: Vec<(i64, Arc<str>)> = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            for (thing, entry) in shard.iter() {
                if locked.contains(thing)
                    || entry
                        .last_dweet_at
                        .is_none_or(|at| now.duration_since(at) > within)
                {
                    continue;
                }
                if let Some(kept) = entry.history.back() {
                    newest.push((kept.created_ms, Arc::clone(&kept.json)));
                }
            }
        }
        newest.sort_by_key(|(created_ms, _)| std::cmp::Reverse(*created_ms));
        newest.truncate(limit);
        newest.into_iter().map(|(_, json)| json).collect()
    }

    /// Subscribes to a thing's new dweets. Listening to a thing that has not dweeted yet is
    /// allowed: a device that is about to come online is worth waiting for.
    pub fn listen(
        &self,
        thing: &str,
        key: Option<&str>,
    ) -> Result<broadcast::Receiver<Bytes>, Refusal> {
        self.lock_table().check_access(thing, key)?;
        let now = Instant::now();
        let mut shard = self.shard(thing);
        let entry = shard.entry(thing.to_owned()).or_default();
        self.take_token(entry, now)?;
        let sender = entry
            .listeners
            .get_or_insert_with(|| broadcast::channel(LISTENER_BACKLOG).0);
        Ok(sender.subscribe())
    }

    fn take_token(&self, entry: &mut Thing, now: Instant) -> Result<(), Refusal> {
        let Some(rate) = self.limits.rate_limit else {
            return Ok(());
        };
        let bucket = entry.bucket.get_or_insert(TokenBucket {
            tokens: rate.max(1.0),
            refilled_at: now,
        });
        if bucket.take(rate, now) {
            Ok(())
        } else {
            Err(Refusal::new(
                429,
                format!("rate limit exceeded: at most {rate} requests per second per thing"),
            ))
        }
    }

    pub fn lock(&self, thing: &str, lock: &str, key: Option<&str>) -> Result<Vec<Change>, Refusal> {
        let mut table = self.lock_table_mut();
        if let Some(current) = table.locked_things.get(thing)
            && current != lock
        {
            return Err(Refusal::new(
                409,
                "this thing is already locked with another lock",
            ));
        }
        let entry = table.lock_with_key(lock, key)?;
        match &entry.thing {
            Some(holder) if holder == thing => return Ok(Vec::new()),
            Some(_) => {
                return Err(Refusal::new(
                    409,
                    "this lock is already in use on another thing",
                ));
            }
            None => entry.thing = Some(thing.to_owned()),
        }
        table
            .locked_things
            .insert(thing.to_owned(), lock.to_owned());
        Ok(table.row(lock).into_iter().collect())
    }

    /// Detaches the thing's lock. Its alert goes too: an alert needs a locked thing, and once
    /// unlocked nobody could prove the right to change it.
    pub fn unlock(&self, thing: &str, key: Option<&str>) -> Result<Vec<Change>, Refusal> {
        let mut table = self.lock_table_mut();
        let Some(lock) = table.locked_things.get(thing).cloned() else {
            return Err(Refusal::new(400, "this thing is not locked"));
        };
        table.lock_with_key(&lock, key)?.thing = None;
        table.locked_things.remove(thing);
        let row = table.row(&lock);
        drop(table);
        self.drop_alert(thing);
        Ok(row.into_iter().chain([self.alert_change(thing)]).collect())
    }

    pub fn remove_lock(&self, lock: &str, key: Option<&str>) -> Result<Vec<Change>, Refusal> {
        let mut table = self.lock_table_mut();
        let entry = table.lock_with_key(lock, key)?;
        let Some(thing) = entry.thing.take() else {
            return Err(Refusal::new(400, protocol::LOCK_NOT_IN_USE));
        };
        table.locked_things.remove(&thing);
        let row = table.row(lock);
        drop(table);
        self.drop_alert(&thing);
        Ok(row.into_iter().chain([self.alert_change(&thing)]).collect())
    }

    fn drop_alert(&self, thing: &str) {
        if let Some(entry) = self.shard(thing).get_mut(thing) {
            entry.alert = None;
        }
    }

    pub fn set_alert(
        &self,
        thing: &str,
        recipients: Vec<Recipient>,
        condition: String,
        key: Option<&str>,
    ) -> Result<(Alert, Change), Refusal> {
        self.lock_table()
            .check_locked_access(thing, key, "alerts")?;
        let record = AlertRecord {
            recipients,
            condition: condition.into(),
            generation: self
                .alert_generations
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            evaluated_through: None,
            counting_day: Utc::now().date_naive(),
            suspended: false,
            status: AlertStatus {
                message: String::new(),
                since: None,
                open: false,
                alerts_sent_today: 0,
                alerts_allowed_today: self.limits.alerts_allowed_per_day,
            },
        };
        let alert = alert_view(thing, &record, false);
        self.shard(thing).entry(thing.to_owned()).or_default().alert = Some(record);
        Ok((alert, self.alert_change(thing)))
    }

    pub fn get_alert(&self, thing: &str, key: Option<&str>) -> Result<Alert, Refusal> {
        self.lock_table().check_access(thing, key)?;
        let shard = self.shard(thing);
        let record = shard
            .get(thing)
            .and_then(|entry| entry.alert.as_ref())
            .ok_or_else(Refusal::not_found)?;
        Ok(alert_view(thing, record, true))
    }

    pub fn remove_alert(&self, thing: &str, key: Option<&str>) -> Result<Change, Refusal> {
        self.lock_table().check_access(thing, key)?;
        let mut shard = self.shard(thing);
        match shard.get_mut(thing).and_then(|entry| entry.alert.take()) {
            Some(_) => Ok(Change::Alert {
                thing: thing.to_owned(),
                json: None,
            }),
            None => Err(Refusal::not_found()),
        }
    }

    /// Forgets expired histories and entries that hold nothing; returns how many entries went,
    /// and the changes that forget the histories on disk too.
    pub fn sweep(&self) -> (usize, Vec<Change>) {
        let now = Instant::now();
        let mut removed = 0;
        let mut changes = Vec::new();
        for shard in &self.shards {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.retain(|thing, entry| {
                if entry.expired(now, self.limits.retention) && !entry.history.is_empty() {
                    entry.history.clear();
                    changes.push(Change::ForgetHistory {
                        thing: thing.clone(),
                    });
                }
                if entry
                    .listeners
                    .as_ref()
                    .is_some_and(|tx| tx.receiver_count() == 0)
                {
                    entry.listeners = None;
                }
                let keep = !entry.is_idle();
                removed += usize::from(!keep);
                keep
            });
        }
        (removed, changes)
    }

    /// Reserves a fresh name for `/dweet`, which invents one: the generator is tried until a
    /// name is free, so a generated name never lands on someone's existing thing.
    pub fn claim_generated_name(&self, mut generate: impl FnMut() -> String) -> String {
        loop {
            let name = generate();
            let mut shard = self.shard(&name);
            if let Entry::Vacant(slot) = shard.entry(name.clone()) {
                slot.insert(Thing::default());
                return name;
            }
        }
    }
}

/// Runs `act` on `thing`'s entry, made when it has none: its name is copied only then, so the
/// lookups a write adds (its gate, its publication) allocate nothing for a known thing.
fn with_thing<R>(
    shard: &mut HashMap<String, Thing>,
    thing: &str,
    act: impl FnOnce(&mut Thing) -> R,
) -> R {
    match shard.get_mut(thing) {
        Some(entry) => act(entry),
        None => act(shard.entry(thing.to_owned()).or_default()),
    }
}

fn alert_view(thing: &str, record: &AlertRecord, with_status: bool) -> Alert {
    Alert {
        thing: thing.to_owned(),
        condition: record.condition.to_string(),
        is_demo: false,
        recipients: record.recipients.clone(),
        status: with_status.then(|| record.status.clone()),
    }
}

fn truncate_to_millis(at: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(at.timestamp_millis()).unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(value: Value) -> Map<String, Value> {
        match value {
            Value::Object(map) => map,
            _ => unreachable!("test content is an object"),
        }
    }

    #[test]
    fn created_is_strictly_increasing_per_thing() {
        let store = Store::new(Limits::default(), []);
        let mut previous = None;
        for _ in 0..200 {
            let written = store
                .write("t", object(serde_json::json!({})), None)
                .unwrap();
            let created = written.dweet.created.to_datetime().unwrap();
            if let Some(previous) = previous {
                assert!(created > previous);
            }
            previous = Some(created);
        }
    }

    #[test]
    fn history_is_capped_and_newest_first() {
        let limits = Limits {
            max_history: 3,
            ..Limits::default()
        };
        let store = Store::new(limits, []);
        let mut created = Vec::new();
        for i in 0..5 {
            let written = store
                .write("t", object(serde_json::json!({ "i": i })), None)
                .unwrap();
            let Change::Dweet {
                created_ms,
                evicted_through,
                ..
            } = &written.change
            else {
                panic!("a write commits a dweet: {:?}", written.change);
            };
            created.push(*created_ms);
            // What the disk forgets is what publishing evicts: all before the oldest of three.
            let oldest_kept = created[created.len().saturating_sub(3)];
            assert_eq!(
                *evicted_through,
                (i >= 3).then(|| oldest_kept - 1),
                "dweet {i}"
            );
            store.publish(&written.change);
        }
        let kept = store.read("t", None, usize::MAX).unwrap();
        assert_eq!(kept.len(), 3);
        assert!(kept[0].contains(r#""i":4"#) && kept[2].contains(r#""i":2"#));
    }

    #[test]
    fn a_dweet_is_seen_only_once_published() {
        let store = Store::new(Limits::default(), []);
        let mut listener = store.listen("t", None).unwrap();
        let refused = store.write("t", object(serde_json::json!({ "i": 1 })), None);
        let refused = refused.unwrap();
        assert!(store.read("t", None, usize::MAX).unwrap().is_empty());
        assert!(
            listener.try_recv().is_err(),
            "nothing heard before the commit"
        );
        let committed = store
            .write("t", object(serde_json::json!({ "i": 2 })), None)
            .unwrap();
        store.publish(&committed.change);
        let kept = store.read("t", None, usize::MAX).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(kept[0].contains(r#""i":2"#));
        assert!(listener.try_recv().is_ok());
        assert!(
            listener.try_recv().is_err(),
            "the refused dweet is never heard"
        );
        // The refused dweet's `created` is not handed out again.
        assert!(committed.dweet.created.to_datetime() > refused.dweet.created.to_datetime());
    }

    #[test]
    fn rate_limit_refuses_bursts() {
        let limits = Limits {
            rate_limit: Some(1.0),
            ..Limits::default()
        };
        let store = Store::new(limits, []);
        store.write("t", Map::new(), None).unwrap();
        let refusal = store.write("t", Map::new(), None).unwrap_err();
        assert!(refusal.because.contains(protocol::RATE_LIMIT_PHRASE));
        store.write("other", Map::new(), None).unwrap();
    }

    #[test]
    fn sweep_forgets_expired_things() {
        let limits = Limits {
            retention: Duration::ZERO,
            ..Limits::default()
        };
        let store = Store::new(limits, []);
        store.write("t", Map::new(), None).unwrap();
        assert_eq!(store.sweep().0, 1);
        assert!(store.read("t", None, 10).is_err());
    }

    /// Thing `t`, locked with key `k`, and a (re)set alert on it.
    fn set_alert_on_t(store: &Store) {
        store
            .set_alert(
                "t",
                vec![Recipient::email("a@b.io")],
                "c".to_owned(),
                Some("k"),
            )
            .unwrap();
    }

    fn alerted_store(limits: Limits) -> Store {
        let store = Store::new(limits, [("l".to_owned(), Key::new("k"))]);
        store.lock("t", "l", Some("k")).unwrap();
        set_alert_on_t(&store);
        store
    }

    #[test]
    fn verdicts_open_close_and_count_against_the_allowance() {
        let store = alerted_store(Limits {
            alerts_allowed_per_day: 1,
            ..Limits::default()
        });
        let fire = |text: &str| Verdict::Fired {
            message: text.to_owned(),
        };
        let evaluate = |verdict: Verdict| {
            let written = store.write("t", Map::new(), Some("k")).unwrap();
            let pending = written
                .evaluation
                .expect("an alerted thing asks for evaluation");
            store.record_verdict("t", &pending, &verdict)
        };
        let opened = evaluate(fire("hot")).expect("opens");
        assert_eq!(opened.kind, NotificationKind::Opened);
        assert!(opened.within_allowance);
        assert!(evaluate(fire("still hot")).is_none(), "already open");
        let status = store.get_alert("t", Some("k")).unwrap().status.unwrap();
        assert!(status.open && status.message == "still hot" && status.since.is_some());
        assert_eq!(
            evaluate(Verdict::Quiet).unwrap().kind,
            NotificationKind::Closed
        );
        let status = store.get_alert("t", Some("k")).unwrap().status.unwrap();
        assert!(!status.open && status.message.is_empty() && status.since.is_none());
        let second = evaluate(fire("hot again")).unwrap();
        assert!(!second.within_allowance, "the day's one alert was used");
        assert_eq!(
            store
                .get_alert("t", Some("k"))
                .unwrap()
                .status
                .unwrap()
                .alerts_sent_today,
            1
        );
    }

    #[test]
    fn stale_verdicts_change_nothing() {
        let store = alerted_store(Limits::default());
        let older = store
            .write("t", Map::new(), Some("k"))
            .unwrap()
            .evaluation
            .unwrap();
        let newer = store
            .write("t", Map::new(), Some("k"))
            .unwrap()
            .evaluation
            .unwrap();
        let fired = Verdict::Fired {
            message: "m".to_owned(),
        };
        assert!(store.record_verdict("t", &newer, &fired).is_some());
        assert!(
            store.record_verdict("t", &older, &Verdict::Quiet).is_none(),
            "an older dweet's verdict does not close what a newer one opened"
        );
        set_alert_on_t(&store);
        let before_replacement = newer;
        assert!(
            store
                .record_verdict("t", &before_replacement, &fired)
                .is_none()
        );
        assert!(
            !store
                .get_alert("t", Some("k"))
                .unwrap()
                .status
                .unwrap()
                .open
        );
    }
}
