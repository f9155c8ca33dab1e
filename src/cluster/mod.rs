//! A dweetpipe cluster: members that run the same things.toml share the fleet, coordinated
//! through a NATS JetStream key-value bucket (no consensus of our own).
//!
//! ```text
//! bucket dweetpipe-<name>, max_age = lease:
//!   member.<member>  {"member", "holding": [things claimed, streaming, or not yet durable]}  renewed every lease/4
//!   leader           <member>                         created, then updated by revision
//!   roster           ["worker-a", ...]                the live members, as the leader last saw them
//! ```
//!
//! A key that is not renewed expires with the bucket's `max_age`, so the live members are the
//! keys present. The leader writes them as the roster, and every member computes ownership
//! with [`ownership::owner_of`] over that one roster, so members never disagree for long on
//! who owns what. A thing is started only after it was *claimed*: put in the member's
//! holding, and a later reading of the others showed no one else holding it. Of two members
//! that both claim a thing, each sees the other's claim (whichever put last read the other's),
//! so neither starts until the roster settles it. What a member lost it holds until its
//! sinks made it durable. A member owns things only while its last renewal was sent less than
//! three quarters of a lease ago ([`OWN_FOR`]): its key expires a whole lease after that
//! renewal, so a member cut off from NATS has stopped, and abandoned what its sinks had not
//! made durable, before any other member can take its things over. While NATS is only slow
//! (a renewal a quarter lease late) it keeps what it has.

pub mod handover;
pub mod ownership;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::nats::{NatsError, connect, redact_urls};
use crate::settings::Invalid;
use crate::telemetry::{Health, Metrics};

/// The longest wait between two turns of the membership loop.
const MAX_TICK: Duration = Duration::from_secs(5);
/// The longest a turn waits on NATS.
const MAX_TURN: Duration = Duration::from_secs(15);
const MEMBER_PREFIX: &str = "member.";
const LEADER_KEY: &str = "leader";
const ROSTER_KEY: &str = "roster";
/// The share of a lease after the last renewal was sent during which a member owns things.
pub const OWN_FOR: f64 = 0.75;

/// The `[cluster]` section.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `nats://host:4222`, or several separated by commas for a NATS cluster.
    #[serde(default)]
    pub nats_url: Option<String>,
    /// The variable holding `nats_url` (it may carry credentials).
    #[serde(default)]
    pub nats_url_env: Option<String>,
    /// Members with the same name share the fleet. Default `dweetpipe`.
    #[serde(default = "default_name")]
    pub name: String,
    /// Unique among live members. Default: the host name.
    #[serde(default)]
    pub member: Option<String>,
    /// A member silent this long is gone and its things move. Default 10s.
    #[serde(
        default = "default_lease",
        deserialize_with = "crate::settings::duration"
    )]
    pub lease: Duration,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("nats_url", &self.nats_url.as_deref().map(redact_urls))
            .field("nats_url_env", &self.nats_url_env)
            .field("name", &self.name)
            .field("member", &self.member)
            .field("lease", &self.lease)
            .finish()
    }
}

fn default_name() -> String {
    "dweetpipe".to_owned()
}

fn default_lease() -> Duration {
    Duration::from_secs(10)
}

/// Letters, digits, `-` and `_` (and `.` for members, as in host names): what a bucket name,
/// a key and a file name all accept.
fn valid_name(name: &str, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (dots && c == '.'))
        && !name.starts_with('.')
        && !name.ends_with('.')
}

impl ClusterConfig {
    /// Reads `nats_url_env` and fills in the member's name from the host; keys in the error
    /// are relative to `[cluster]`.
    pub fn resolve(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        self.nats_url = Some(crate::settings::address(
            ("nats_url", self.nats_url.as_deref()),
            ("nats_url_env", self.nats_url_env.as_deref()),
            &env,
            None,
            "set nats_url = \"nats://127.0.0.1:4222\" or nats_url_env = \"NATS_URL\"",
        )?);
        if self.member.is_none() {
            self.member = host_name().map(|h| h.replace(|c: char| !valid_char(c), "-"));
        }
        let Some(member) = &self.member else {
            return Err(Invalid::new(
                "member",
                "the host name cannot be read",
                "set member = \"worker-a\" (unique among the cluster's members)",
            ));
        };
        if !valid_name(member, true) {
            return Err(Invalid::new(
                "member",
                format!("{member:?} is not a usable member name"),
                "use up to 64 letters, digits, '-', '_' and '.' (unique among live members)",
            ));
        }
        if !valid_name(&self.name, false) {
            return Err(Invalid::new(
                "name",
                format!("{:?} is not a usable cluster name", self.name),
                "use up to 64 letters, digits, '-' and '_'",
            ));
        }
        if self.lease < Duration::from_secs(1) || self.lease > Duration::from_secs(600) {
            return Err(Invalid::new(
                "lease",
                "must be between 1s and 10m",
                "10s suits most fleets: a lost member's things move within about that long",
            ));
        }
        Ok(())
    }

    /// This member's name (after [`resolve`](Self::resolve)).
    pub fn member(&self) -> &str {
        self.member.as_deref().unwrap_or_default()
    }

    fn bucket(&self) -> String {
        format!("dweetpipe-{}", self.name)
    }

    /// How often a member renews and looks at the others: four times a lease, and at least
    /// every 5 s, so a long lease never leaves the membership loop quiet for longer than the
    /// health check's `stuck_after` (30 s by default) allows.
    pub fn tick(&self) -> Duration {
        (self.lease / 4).clamp(Duration::from_millis(250), MAX_TICK)
    }

    /// How long one turn may wait on NATS: never past half a lease (a hung request must not
    /// freeze the view), nor past 15 s (with [`ClusterConfig::tick`], the loop turns within
    /// 20 s whatever the lease).
    pub fn turn_timeout(&self) -> Duration {
        (self.lease / 2).min(MAX_TURN)
    }
}

fn valid_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'
}

fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// One member as the bucket says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberEntry {
    pub member: String,
    /// This process, so two processes given the same member name find out.
    #[serde(default)]
    pub instance: String,
    /// Things it streams, or stopped but not yet durable in its sinks.
    #[serde(default)]
    pub holding: BTreeSet<String>,
}

/// What this member knows of the cluster, as of its last turn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The roster: the live members as the leader last wrote them, sorted; empty while this
    /// member cannot renew its membership.
    pub members: Vec<String>,
    /// What this member's entry held when the others were read for this view: things here
    /// were claimed before `held_elsewhere` was read.
    pub published: BTreeSet<String>,
    /// Things held by another live member, and which.
    pub held_elsewhere: BTreeMap<String, String>,
    /// Renewed within the lease: may own things.
    pub connected: bool,
    /// Holds the leader key: reconciles locks and alerts.
    pub leader: bool,
    /// Two turns have passed since this member joined: members started together have seen
    /// each other (and the roster says so) before any of them claims a thing.
    pub settled: bool,
}

impl View {
    /// Whether `member` owns `thing` in this view.
    pub fn owns(&self, member: &str, thing: &str) -> bool {
        self.connected
            && ownership::owner_of(thing, self.members.iter().map(String::as_str)) == Some(member)
    }
}

/// This process's membership: a task that renews it, watches the others and elects the
/// lifecycle leader; the worker reads the [`View`] and reports what it holds.
pub struct Membership {
    config: ClusterConfig,
    view: watch::Receiver<View>,
    holding: Arc<Mutex<BTreeSet<String>>>,
    /// Asks the task for a turn now (a claim to publish).
    hurry: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
    task: JoinHandle<Option<kv::Store>>,
}

impl Membership {
    /// Starts the membership task; NATS need not answer yet (then this member owns nothing
    /// until it does, and `/readyz` says why).
    pub async fn join(
        config: ClusterConfig,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Membership, NatsError> {
        let client = connect(
            config.nats_url.as_deref().unwrap_or_default(),
            &format!("dweetpipe {}", config.member()),
            false,
        )
        .await?;
        let (sender, view) = watch::channel(View::default());
        let holding = Arc::new(Mutex::new(BTreeSet::new()));
        let hurry = Arc::new(tokio::sync::Notify::new());
        let stop = CancellationToken::new();
        let turn = Turns {
            hurry: Arc::clone(&hurry),
            roster: Vec::new(),
            instance: uuid::Uuid::new_v4().simple().to_string(),
            good_turns: 0,
            impostor_seen: None,
            config: config.clone(),
            js: jetstream::new(client),
            store: None,
            holding: Arc::clone(&holding),
            view: sender,
            metrics,
            health,
            renewed: None,
            leader: None,
            last_problem: String::new(),
        };
        let task = tokio::spawn(turn.run(stop.clone()));
        Ok(Membership {
            config,
            view,
            holding,
            hurry,
            stop,
            task,
        })
    }

    pub fn member(&self) -> &str {
        self.config.member()
    }

    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    /// The latest view.
    pub fn view(&self) -> View {
        self.view.borrow().clone()
    }

    /// Resolves when the view changes.
    pub async fn changed(&mut self) {
        if self.view.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Waits up to `patience` for the first renewed view.
    pub async fn first_view(&mut self, patience: Duration) -> View {
        let _ = tokio::time::timeout(patience, self.view.wait_for(|v| v.connected)).await;
        self.view()
    }

    /// What this member holds (claims included), published with its next renewal; `now`
    /// asks for that renewal at once.
    pub fn set_holding(&self, things: BTreeSet<String>, now: bool) {
        *self.holding.lock().unwrap_or_else(|p| p.into_inner()) = things;
        if now {
            self.hurry.notify_one();
        }
    }

    /// Leaves at once: the member key (and the leader key, if held) is deleted, so the others
    /// take its things without waiting for the lease.
    pub async fn leave(self) {
        self.stop.cancel();
        let store = self.task.await.ok().flatten();
        if let Some(store) = store {
            let key = format!("{MEMBER_PREFIX}{}", self.config.member());
            let _ = tokio::time::timeout(Duration::from_secs(2), store.delete(&key)).await;
        }
    }
}

/// The membership task's state.
struct Turns {
    config: ClusterConfig,
    hurry: Arc<tokio::sync::Notify>,
    /// The last roster read (kept while the key is briefly missing, between two leaders).
    roster: Vec<String>,
    /// This process's id in its entry.
    instance: String,
    /// Turns that renewed the membership and read the others.
    good_turns: u64,
    /// When another process was last seen renewing this member's entry.
    impostor_seen: Option<Instant>,
    js: jetstream::Context,
    store: Option<kv::Store>,
    holding: Arc<Mutex<BTreeSet<String>>>,
    view: watch::Sender<View>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// When the last renewal that succeeded was sent.
    renewed: Option<Instant>,
    /// The leader key's revision and when it was last renewed, while this member leads.
    leader: Option<(u64, Instant)>,
    last_problem: String,
}

impl Turns {
    async fn run(mut self, stop: CancellationToken) -> Option<kv::Store> {
        let beat = self.health.register_loop("cluster membership");
        let mut ticks = tokio::time::interval(self.config.tick());
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            beat.beat();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
                () = self.hurry.notified() => {}
            }
            // A hung turn must not keep this member owning past its share of the lease.
            let patience = match self.renewed {
                Some(at) => {
                    let lapses = at + self.config.lease.mul_f64(OWN_FOR);
                    let left = lapses.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        self.config.turn_timeout()
                    } else {
                        self.config.turn_timeout().min(left)
                    }
                }
                None => self.config.turn_timeout(),
            };
            let turn = tokio::time::timeout(patience, self.turn());
            let seen = match turn.await {
                Ok(Ok(seen)) => Some(seen),
                Ok(Err(problem)) => {
                    self.problem(problem);
                    None
                }
                Err(_) => {
                    self.problem(format!("NATS did not answer within {patience:?}"));
                    None
                }
            };
            self.publish(seen);
        }
        if let (Some(store), Some((revision, _))) = (&self.store, self.leader) {
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                store.delete_expect_revision(LEADER_KEY, Some(revision)),
            )
            .await;
            self.metrics.cluster_leader.set(0);
        }
        self.store
    }

    /// The members' bucket, created when missing. Its stream is made here as the key-value
    /// layout asks (`KV_<bucket>`, one message per key, rollups, direct gets) because the
    /// client's `create_key_value` first reads account details in a form the NATS 2.9 of
    /// Debian 12 does not send.
    async fn open_bucket(&self) -> Result<kv::Store, String> {
        let bucket = self.config.bucket();
        if let Ok(store) = self.js.get_key_value(&bucket).await {
            return Ok(store);
        }
        let lease = self.config.lease;
        let created = self
            .js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("KV_{bucket}"),
                description: Some("dweetpipe cluster membership".to_owned()),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                max_age: lease,
                duplicate_window: lease,
                storage: jetstream::stream::StorageType::File,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await;
        if let Err(error) = created {
            return Err(format!(
                "cannot create the key-value bucket {bucket}: {error}"
            ));
        }
        self.js
            .get_key_value(&bucket)
            .await
            .map_err(|error| format!("cannot open the key-value bucket {bucket}: {error}"))
    }

    /// Renews, reads the members, and takes or keeps the leader key.
    async fn turn(&mut self) -> Result<(Vec<MemberEntry>, BTreeSet<String>), String> {
        let store = match &self.store {
            Some(store) => store.clone(),
            None => {
                let store = self.open_bucket().await?;
                self.store = Some(store.clone());
                store
            }
        };
        let me = MemberEntry {
            member: self.config.member().to_owned(),
            instance: self.instance.clone(),
            holding: self
                .holding
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        };
        let value = serde_json::to_vec(&me).unwrap_or_default();
        let key = format!("{MEMBER_PREFIX}{}", me.member);
        // Since this process's last renewal, did another one write this member's entry? (Not
        // before the first: that entry may be this member's own from before a restart.)
        if self.renewed.is_some()
            && let Ok(Some(value)) = store.get(&key).await
            && let Ok(entry) = serde_json::from_slice::<MemberEntry>(&value)
            && entry.instance != me.instance
        {
            self.impostor_seen = Some(Instant::now());
        }
        // The key's lease runs from when the server stored it, which is after this.
        let sent = Instant::now();
        match store.put(&key, value.into()).await {
            Ok(_) => {
                self.renewed = Some(sent);
                self.metrics.cluster_renewal(true);
            }
            Err(error) => {
                self.metrics.cluster_renewal(false);
                return Err(format!("cannot renew the membership: {error}"));
            }
        }
        let members = read_members(&store).await?;
        self.lead(&store).await;
        if self.leader.is_some() {
            let mut live: Vec<String> = members.iter().map(|m| m.member.clone()).collect();
            live.sort();
            live.dedup();
            // Written every turn: the key expires like the others when no one leads.
            let value = serde_json::to_vec(&live).unwrap_or_default();
            store
                .put(ROSTER_KEY, value.into())
                .await
                .map_err(|e| format!("cannot write the roster: {e}"))?;
            self.roster = live;
        } else if let Some(roster) = read_roster(&store).await {
            self.roster = roster;
        }
        Ok((members, me.holding))
    }

    async fn lead(&mut self, store: &kv::Store) {
        let me = self.config.member().as_bytes().to_vec();
        let attempt = match self.leader {
            Some((revision, _)) => store
                .update(LEADER_KEY, me.into(), revision)
                .await
                .map_err(|e| e.to_string()),
            None => store
                .create(LEADER_KEY, me.into())
                .await
                .map_err(|e| e.to_string()),
        };
        match attempt {
            Ok(revision) => {
                if self.leader.is_none() {
                    tracing::info!(
                        member = self.config.member(),
                        "leading the cluster: this member reconciles locks and alerts"
                    );
                }
                self.leader = Some((revision, Instant::now()));
            }
            Err(error) => {
                if self.leader.take().is_some() {
                    tracing::warn!(%error, "no longer the cluster's leader");
                }
            }
        }
    }

    fn problem(&mut self, problem: String) {
        if problem != self.last_problem {
            tracing::warn!(
                nats = %redact_urls(self.config.nats_url.as_deref().unwrap_or_default()),
                %problem,
                "cluster membership"
            );
            self.last_problem = problem;
        }
    }

    /// Sends the new view (when it changed), and feeds the metrics and `/readyz`.
    fn publish(&mut self, seen: Option<(Vec<MemberEntry>, BTreeSet<String>)>) {
        let lease = self.config.lease;
        // Two processes renewing one member's entry would both stream its things: while
        // another was seen within the lease, this one owns nothing.
        let impostor = self.impostor_seen.is_some_and(|at| at.elapsed() < lease);
        let connected = !impostor
            && self
                .renewed
                .is_some_and(|at| at.elapsed() < lease.mul_f64(OWN_FOR));
        let me = self.config.member().to_owned();
        let mut next = self.view.borrow().clone();
        next.connected = connected;
        // A leader that could not renew for half a lease steps down before the key expires.
        if self.leader.is_some_and(|(_, at)| at.elapsed() >= lease / 2) {
            self.leader = None;
        }
        next.leader = connected && self.leader.is_some();
        if let Some((seen, published)) = seen {
            self.last_problem.clear();
            self.good_turns += 1;
            next.settled = self.good_turns >= 3;
            next.members = self.roster.clone();
            next.published = published;
            next.held_elsewhere = seen
                .into_iter()
                .filter(|m| m.member != me)
                .flat_map(|m| {
                    let member = m.member;
                    m.holding.into_iter().map(move |t| (t, member.clone()))
                })
                .collect();
        }
        if impostor {
            next.members.clear();
            next.published.clear();
            next.held_elsewhere.clear();
            self.health.set_cluster_problem(Some(format!(
                "another process renews the member name {me:?}; this one owns no things until it stops (give each member a name of its own)"
            )));
            tracing::error!(member = %me, "another process uses this member name; owning no things");
        } else if !connected {
            next.members.clear();
            next.published.clear();
            next.held_elsewhere.clear();
            let since = self.renewed.map_or("start-up".to_owned(), |at| {
                format!("{:.0?} ago", at.elapsed())
            });
            self.health.set_cluster_problem(Some(format!(
                "cannot renew cluster membership in NATS (last renewed {since}); this member owns no things"
            )));
        } else {
            self.health.set_cluster_problem(None);
        }
        self.metrics.cluster_members.set(next.members.len() as i64);
        self.metrics.cluster_leader.set(i64::from(next.leader));
        self.view.send_if_modified(|view| {
            if *view == next {
                false
            } else {
                *view = next;
                true
            }
        });
    }
}

/// Every live member's entry (an unreadable one is logged and left out).
async fn read_members(store: &kv::Store) -> Result<Vec<MemberEntry>, String> {
    let mut members = Vec::new();
    let mut listed = store
        .keys()
        .await
        .map_err(|e| format!("cannot list the members: {e}"))?;
    // A key renewed while the listing runs can be listed twice: read each once.
    let mut keys = std::collections::BTreeSet::new();
    while let Some(key) = listed.next().await {
        if let Ok(key) = key
            && key.starts_with(MEMBER_PREFIX)
        {
            keys.insert(key);
        }
    }
    for key in keys {
        match store.get(&key).await {
            Ok(Some(value)) => match serde_json::from_slice::<MemberEntry>(&value) {
                Ok(entry) => members.push(entry),
                Err(error) => tracing::warn!(%key, %error, "ignoring an unreadable member entry"),
            },
            Ok(None) => {}
            Err(error) => return Err(format!("cannot read {key}: {error}")),
        }
    }
    members.sort_by(|a, b| a.member.cmp(&b.member));
    Ok(members)
}

/// The roster the leader last wrote, if it is there and readable.
async fn read_roster(store: &kv::Store) -> Option<Vec<String>> {
    let value = store.get(ROSTER_KEY).await.ok()??;
    serde_json::from_slice(&value).ok()
}

/// The cluster as the bucket says now, for `dweetpipe check`.
#[derive(Debug, Default)]
pub struct Survey {
    pub members: Vec<MemberEntry>,
    pub leader: Option<String>,
    /// What ownership is computed over: the leader's roster, or the live members without one.
    pub roster: Vec<String>,
}

pub async fn survey(config: &ClusterConfig) -> Result<Survey, NatsError> {
    let urls = config.nats_url.as_deref().unwrap_or_default();
    let client = connect(urls, "dweetpipe check", true).await?;
    let js = jetstream::new(client);
    let Ok(store) = js.get_key_value(config.bucket()).await else {
        return Ok(Survey::default());
    };
    let members = read_members(&store)
        .await
        .map_err(|problem| NatsError::new(urls, problem))?;
    let leader = match store.get(LEADER_KEY).await {
        Ok(Some(value)) => Some(String::from_utf8_lossy(&value).into_owned()),
        _ => None,
    };
    let roster = read_roster(&store)
        .await
        .unwrap_or_else(|| members.iter().map(|m| m.member.clone()).collect());
    Ok(Survey {
        members,
        leader,
        roster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(text: &str) -> ClusterConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_the_url_from_the_environment() {
        let mut config = section("nats_url_env = \"NATS_URL\"\nmember = \"worker-a\"");
        config
            .resolve(|name| (name == "NATS_URL").then(|| "nats://u:hunter2@h:4222".to_owned()))
            .unwrap();
        assert_eq!(config.name, "dweetpipe");
        assert_eq!(config.lease, Duration::from_secs(10));
        assert_eq!(config.bucket(), "dweetpipe-dweetpipe");
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn the_membership_loop_turns_well_within_stuck_after_whatever_the_lease() {
        // (lease, tick, turn timeout)
        let cases = [
            ("1s", 250, 500),
            ("2s", 500, 1000),
            ("10s", 2500, 5000),
            ("2m", 5000, 15_000),
            ("10m", 5000, 15_000),
        ];
        for (lease, tick_ms, turn_ms) in cases {
            let config = section(&format!(
                "nats_url = \"nats://h\"\nmember = \"a\"\nlease = \"{lease}\""
            ));
            assert_eq!(config.tick(), Duration::from_millis(tick_ms), "{lease}");
            assert_eq!(
                config.turn_timeout(),
                Duration::from_millis(turn_ms),
                "{lease}"
            );
            assert!(
                config.tick() + config.turn_timeout() < Duration::from_secs(30),
                "{lease}: the loop beats within the default stuck_after"
            );
        }
    }

    #[test]
    fn mistakes_name_the_key() {
        let cases = [
            ("member = \"a\"", "nats_url"),
            (
                "nats_url = \"nats://h\"\nnats_url_env = \"X\"\nmember = \"a\"",
                "nats_url_env",
            ),
            ("nats_url_env = \"UNSET\"\nmember = \"a\"", "nats_url_env"),
            ("nats_url = \"nats://h\"\nmember = \"a b\"", "member"),
            (
                "nats_url = \"nats://h\"\nmember = \"a\"\nname = \"x.y\"",
                "name",
            ),
            (
                "nats_url = \"nats://h\"\nmember = \"a\"\nlease = \"100ms\"",
                "lease",
            ),
        ];
        for (text, key) in cases {
            let error = section(text).resolve(|_| None).unwrap_err();
            assert_eq!(error.key, key, "{text}");
        }
    }

    #[test]
    fn the_member_defaults_to_the_host_name() {
        let mut config = section("nats_url = \"nats://h\"");
        config.resolve(|_| None).unwrap();
        assert!(valid_name(config.member(), true), "{:?}", config.member);
    }

    #[test]
    fn ownership_needs_a_renewed_membership() {
        let mut view = View {
            members: vec!["a".to_owned()],
            connected: true,
            ..View::default()
        };
        assert!(view.owns("a", "thing"));
        view.connected = false;
        assert!(!view.owns("a", "thing"));
    }
}
