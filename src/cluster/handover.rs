//! The handover of things between members, as a pure function: from the membership
//! [`View`], what this member runs, which things its sinks hold durably and the clock,
//! [`Handover::turn`] decides what to do with each thing. The worker only carries the
//! decisions out (stop or start a subscription, ask the sinks to seal or to look at the
//! others' files), so every rule here is table-tested without a process or a NATS server.
//!
//! The rules, in the order a thing meets them:
//! - a thing this member runs but no longer owns is stopped and *held* (it stays in the
//!   member's published holding) until every sink made durable what it emitted here, or two
//!   leases passed; meanwhile the sinks seal early;
//! - a thing it owns but does not run is *claimed* first (published in its holding); only a
//!   view read after the claim can clear it;
//! - then it *waits* while another live member still holds it, for at most
//!   [`HANDOVER_PATIENCE`] leases (that member's sink may be failing), and is *taken over*;
//! - nothing is claimed before the view settled, so members started together see each other
//!   first rather than the first one taking the whole fleet;
//! - a member whose lease may have lapsed (its view is not connected) *abandons* whatever it
//!   streams or holds: others may already have taken those things over and backfilled them,
//!   so its sinks must drop, not seal or publish, what they hold of them. A handover given up
//!   after [`RELEASE_PATIENCE`] leases is abandoned the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::View;

/// Leases a new owner waits for the previous one to hand a thing over before it starts the
/// thing anyway.
pub const HANDOVER_PATIENCE: f64 = 3.0;
/// Leases a member holds a thing it lost while its sinks are not done with it.
pub const RELEASE_PATIENCE: u32 = 2;

/// What this member does with one thing this turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Keep streaming it.
    Stream,
    /// Stop streaming it and hold it until its records are durable here (another member
    /// owns it now).
    Stop,
    /// Still held: its records are not all durable here yet.
    Hold,
    /// No longer held: everything it emitted here is durable, so the new owner's backfill
    /// finds it.
    Release,
    /// No longer held although not all is durable: two leases passed. What is not durable
    /// here is forsaken (the new owner starts after three and backfills it).
    ReleaseOverdue,
    /// This member may have lost its lease: stop the thing if it streams, hold it no more, and
    /// forsake what is not durable here (the new owner may have backfilled it already).
    Abandon,
    /// Owned here: publish the claim before anything else.
    Claim,
    /// Owned and claimed, but this member still holds it: wait for its handover.
    Wait { holder: String },
    /// Start streaming it: it moved here. `forced_from` names a holder that did not hand it
    /// over within the patience.
    TakeOver { forced_from: Option<String> },
}

/// What one turn decided, for the worker to carry out.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Turn {
    /// Every thing that is not idle here, with its decision.
    pub decisions: BTreeMap<String, Decision>,
    /// What this member must publish as holding: streaming, held, claimed or waiting.
    pub holding: BTreeSet<String>,
    /// A claim was made this turn: publish it now rather than at the next renewal.
    pub claimed_now: bool,
}

impl Turn {
    /// The things with `decision`.
    pub fn with<'a>(
        &'a self,
        pick: impl Fn(&Decision) -> bool + 'a,
    ) -> impl Iterator<Item = &'a str> {
        self.decisions
            .iter()
            .filter(move |(_, d)| pick(d))
            .map(|(t, _)| t.as_str())
    }

    pub fn to_stop(&self) -> Vec<&str> {
        self.with(|d| matches!(d, Decision::Stop | Decision::Abandon))
            .collect()
    }

    /// The things whose records not durable here must not be stored by this member now.
    pub fn to_forsake(&self) -> Vec<&str> {
        self.with(|d| matches!(d, Decision::Abandon | Decision::ReleaseOverdue))
            .collect()
    }

    pub fn to_start(&self) -> Vec<&str> {
        self.with(|d| matches!(d, Decision::TakeOver { .. }))
            .collect()
    }

    /// Something is held for a handover: the sinks should make it durable soon.
    pub fn sinks_should_seal(&self) -> bool {
        self.with(|d| matches!(d, Decision::Stop | Decision::Hold))
            .next()
            .is_some()
    }

    /// A thing moved here: the sinks should read what the others stored first.
    pub fn sinks_should_absorb(&self) -> bool {
        !self.to_start().is_empty()
    }

    /// A handover is under way: look again soon rather than at the next view change.
    pub fn in_progress(&self) -> bool {
        self.with(|d| {
            matches!(
                d,
                Decision::Stop | Decision::Hold | Decision::Claim | Decision::Wait { .. }
            )
        })
        .next()
        .is_some()
    }
}

/// What a member sees at the start of a turn.
pub struct Situation<'a> {
    pub me: &'a str,
    pub view: &'a View,
    pub lease: Duration,
    pub now: Instant,
    /// The configured things, in the file's order.
    pub configured: &'a [&'a str],
    /// The things this member streams now.
    pub streaming: &'a BTreeSet<&'a str>,
    /// Whether every sink made durable all that a thing's subscription emitted here.
    pub durable: &'a dyn Fn(&str) -> bool,
}

/// A member's handovers in progress, carried from turn to turn.
#[derive(Debug, Default, Clone)]
pub struct Handover {
    /// Things stopped here and held until durable; since when.
    releasing: BTreeMap<String, Instant>,
    /// Things owned here but not started yet (claiming, or waiting for the holder); since when.
    waiting: BTreeMap<String, Instant>,
}

impl Handover {
    /// Decides this turn. The state it keeps (what is held, what waits and since when)
    /// changes as if the worker carried every decision out.
    pub fn turn(&mut self, now: &Situation<'_>) -> Turn {
        let Situation {
            me, view, lease, ..
        } = *now;
        let mut turn = Turn::default();

        if !view.connected {
            // The lease may have lapsed: nothing here is this member's any more.
            let held = std::mem::take(&mut self.releasing).into_keys();
            let streaming = now.streaming.iter().map(|t| (*t).to_owned());
            turn.decisions = streaming
                .chain(held)
                .map(|t| (t, Decision::Abandon))
                .collect();
            self.waiting.clear();
            return turn;
        }
        for &thing in now.streaming {
            let decision = if view.owns(me, thing) {
                Decision::Stream
            } else {
                self.releasing.insert(thing.to_owned(), now.now);
                Decision::Stop
            };
            turn.decisions.insert(thing.to_owned(), decision);
        }
        // Judged from the next turn on: a thing stopped just now may still be emitting.
        let overdue_after = lease * RELEASE_PATIENCE;
        self.releasing.retain(|thing, since| {
            if turn.decisions.contains_key(thing) {
                return true;
            }
            let decision = if view.owns(me, thing) {
                // Owned again before it was released: it goes through a claim like any other.
                return false;
            } else if (now.durable)(thing) {
                Decision::Release
            } else if now.now.saturating_duration_since(*since) > overdue_after {
                Decision::ReleaseOverdue
            } else {
                Decision::Hold
            };
            let keep = decision == Decision::Hold;
            turn.decisions.insert(thing.clone(), decision);
            keep
        });

        // In the file's order; a set too, so that dropping stale waits is not quadratic in a
        // large fleet's handover.
        let owned: Vec<&str> = now
            .configured
            .iter()
            .copied()
            .filter(|t| {
                view.settled
                    && view.owns(me, t)
                    && !now.streaming.contains(t)
                    && !self.releasing.contains_key(*t)
            })
            .collect();
        let owned_set: BTreeSet<&str> = owned.iter().copied().collect();
        self.waiting
            .retain(|thing, _| owned_set.contains(thing.as_str()));
        for thing in owned {
            let since = *self.waiting.entry(thing.to_owned()).or_insert(now.now);
            let decision = if !view.published.contains(thing) {
                turn.claimed_now = true;
                Decision::Claim
            } else {
                match view.held_elsewhere.get(thing) {
                    Some(holder)
                        if now.now.saturating_duration_since(since)
                            < lease.mul_f64(HANDOVER_PATIENCE) =>
                    {
                        Decision::Wait {
                            holder: holder.clone(),
                        }
                    }
                    holder => {
                        self.waiting.remove(thing);
                        Decision::TakeOver {
                            forced_from: holder.cloned(),
                        }
                    }
                }
            };
            turn.decisions.insert(thing.to_owned(), decision);
        }

        turn.holding = turn
            .decisions
            .iter()
            .filter(|(_, d)| {
                !matches!(
                    d,
                    Decision::Stop
                        | Decision::Release
                        | Decision::ReleaseOverdue
                        | Decision::Abandon
                )
            })
            .map(|(t, _)| t.clone())
            .chain(self.releasing.keys().cloned())
            .collect();
        turn
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ownership::owner_of;

    const LEASE: Duration = Duration::from_secs(10);

    /// The first of `board-0`, `board-1`, ... that `owner` owns among `members`.
    fn owned_by(owner: &str, members: &[&str]) -> String {
        (0..)
            .map(|n| format!("board-{n}"))
            .find(|t| owner_of(t, members.iter().copied()) == Some(owner))
            .unwrap_or_default()
    }

    fn view(members: &[&str], published: &[&str], held_elsewhere: &[(&str, &str)]) -> View {
        View {
            members: members.iter().map(|m| (*m).to_owned()).collect(),
            published: published.iter().map(|t| (*t).to_owned()).collect(),
            held_elsewhere: held_elsewhere
                .iter()
                .map(|(t, m)| ((*t).to_owned(), (*m).to_owned()))
                .collect(),
            connected: true,
            leader: false,
            settled: true,
        }
    }

    /// One member's turns against a scripted world.
    struct Member {
        handover: Handover,
        streaming: BTreeSet<String>,
        durable: BTreeSet<String>,
        configured: Vec<String>,
        start: Instant,
    }

    impl Member {
        fn new(configured: &[&String]) -> Self {
            Member {
                handover: Handover::default(),
                streaming: BTreeSet::new(),
                durable: BTreeSet::new(),
                configured: configured.iter().map(|t| (*t).clone()).collect(),
                start: Instant::now(),
            }
        }

        /// A turn `at` after the first, carrying the decisions out as the worker does.
        fn turn(&mut self, view: &View, at: Duration) -> Turn {
            let durable = self.durable.clone();
            let is_durable = move |thing: &str| durable.contains(thing);
            let configured: Vec<&str> = self.configured.iter().map(String::as_str).collect();
            let streaming: BTreeSet<&str> = self.streaming.iter().map(String::as_str).collect();
            let turn = self.handover.turn(&Situation {
                me: "a",
                view,
                lease: LEASE,
                now: self.start + at,
                configured: &configured,
                streaming: &streaming,
                durable: &is_durable,
            });
            for thing in turn.to_stop() {
                self.streaming.remove(thing);
            }
            for thing in turn.to_start() {
                self.streaming.insert(thing.to_owned());
            }
            turn
        }
    }

    fn decision(turn: &Turn, thing: &str) -> Option<Decision> {
        turn.decisions.get(thing).cloned()
    }

    #[test]
    fn a_new_member_claims_before_it_starts_and_reads_the_others_first() {
        let pair = ["a", "b"];
        let mine = owned_by("a", &pair);
        let secs = Duration::from_secs;
        let take_over = Some(Decision::TakeOver { forced_from: None });

        // 1. Started together: nothing is claimed before the view settled.
        let mut member = Member::new(&[&mine]);
        let unsettled = View {
            settled: false,
            ..view(&pair, &[], &[])
        };
        let turn = member.turn(&unsettled, secs(0));
        assert!(turn.decisions.is_empty() && turn.holding.is_empty() && !turn.claimed_now);

        // 2. Settled: an owned thing is claimed first, and the claim is published at once.
        let turn = member.turn(&view(&pair, &[], &[]), secs(1));
        assert_eq!(decision(&turn, &mine), Some(Decision::Claim));
        assert!(turn.claimed_now && turn.holding.contains(&mine) && turn.in_progress());

        // 3. A view read after the claim, nobody else holding it: it starts, and the sinks
        //    first read what other members stored.
        let turn = member.turn(&view(&pair, &[&mine], &[]), secs(2));
        assert_eq!(decision(&turn, &mine), take_over);
        assert!(turn.sinks_should_absorb() && !turn.claimed_now);
        assert_eq!(member.streaming, BTreeSet::from([mine.clone()]));

        // 4. Streaming on: nothing to do, nothing in progress.
        let turn = member.turn(&view(&pair, &[&mine], &[]), secs(3));
        assert_eq!(decision(&turn, &mine), Some(Decision::Stream));
        assert!(!turn.in_progress() && !turn.sinks_should_seal() && !turn.sinks_should_absorb());
    }

    #[test]
    fn a_lost_thing_is_held_until_durable_or_two_leases() {
        let secs = Duration::from_secs;

        // 5. Join: a third member takes one of this member's things. It stops, stays held,
        //    and the sinks seal early.
        let trio = ["a", "b", "c"];
        let moving = owned_by("c", &trio);
        let staying = owned_by("a", &trio);
        let mut member = Member::new(&[&moving, &staying]);
        member.streaming = BTreeSet::from([moving.clone(), staying.clone()]);
        let joined = view(&trio, &[&moving, &staying], &[]);
        let turn = member.turn(&joined, secs(0));
        assert_eq!(decision(&turn, &moving), Some(Decision::Stop));
        assert_eq!(decision(&turn, &staying), Some(Decision::Stream));
        assert!(turn.sinks_should_seal() && turn.holding.contains(&moving));

        // 6. A slow seal: not durable yet, within two leases: still held.
        let turn = member.turn(&joined, secs(15));
        assert_eq!(decision(&turn, &moving), Some(Decision::Hold));
        assert!(turn.holding.contains(&moving) && turn.in_progress());

        // 7. Durable: released, so the new owner stops waiting.
        member.durable.insert(moving.clone());
        let turn = member.turn(&joined, secs(16));
        assert_eq!(decision(&turn, &moving), Some(Decision::Release));
        assert!(!turn.holding.contains(&moving) && !turn.sinks_should_seal());
        let turn = member.turn(&joined, secs(17));
        assert_eq!(decision(&turn, &moving), None);

        // 8. A seal that never finishes (the directory is failing): given up after two
        //    leases; what is not durable here is forsaken, not sealed later (the new owner
        //    starts after three and backfills it).
        let mut member = Member::new(&[&moving]);
        member.streaming = BTreeSet::from([moving.clone()]);
        member.turn(&joined, secs(0));
        let turn = member.turn(&joined, secs(20));
        assert_eq!(decision(&turn, &moving), Some(Decision::Hold));
        let turn = member.turn(&joined, secs(21));
        assert_eq!(decision(&turn, &moving), Some(Decision::ReleaseOverdue));
        assert!(!turn.holding.contains(&moving));
        assert_eq!(turn.to_forsake(), vec![moving.as_str()]);
    }

    #[test]
    fn a_thing_left_by_a_member_waits_for_its_handover_at_most_three_leases() {
        let alone = ["a"];
        let theirs = owned_by("b", &["a", "b"]);
        let secs = Duration::from_secs;
        let take_over = Some(Decision::TakeOver { forced_from: None });

        // 9. Leave: the other member went from the roster but still holds the thing (its
        //    sinks are finishing): wait for it.
        let mut member = Member::new(&[&theirs]);
        let left = view(&alone, &[&theirs], &[(&theirs, "b")]);
        let turn = member.turn(&left, secs(0));
        assert_eq!(
            decision(&turn, &theirs),
            Some(Decision::Wait {
                holder: "b".to_owned()
            })
        );
        assert!(turn.holding.contains(&theirs) && member.streaming.is_empty());

        // 10. It hands over: the thing starts here.
        let turn = member.turn(&view(&alone, &[&theirs], &[]), secs(5));
        assert_eq!(decision(&turn, &theirs), take_over);

        // 11. An abandoned handover: the holder never lets go; after three leases the thing
        //     starts anyway, naming whom it was taken from.
        let mut member = Member::new(&[&theirs]);
        member.turn(&left, secs(0));
        let turn = member.turn(&left, secs(29));
        assert!(matches!(
            decision(&turn, &theirs),
            Some(Decision::Wait { .. })
        ));
        let turn = member.turn(&left, secs(30));
        assert_eq!(
            decision(&turn, &theirs),
            Some(Decision::TakeOver {
                forced_from: Some("b".to_owned())
            })
        );
    }

    #[test]
    fn a_crashed_member_s_things_start_after_the_claim() {
        let alone = ["a"];
        let theirs = owned_by("b", &["a", "b"]);
        let secs = Duration::from_secs;
        let take_over = Some(Decision::TakeOver { forced_from: None });

        // 12. Crash: the other member's entry expired with it, so nothing holds its things;
        //     they start as soon as the claim is seen.
        let mut member = Member::new(&[&theirs]);
        let crashed = view(&alone, &[], &[]);
        assert_eq!(
            decision(&member.turn(&crashed, secs(0)), &theirs),
            Some(Decision::Claim)
        );
        let turn = member.turn(&view(&alone, &[&theirs], &[]), secs(1));
        assert_eq!(decision(&turn, &theirs), take_over);
    }

    #[test]
    fn a_partitioned_member_stops_everything_and_claims_again_when_back() {
        let pair = ["a", "b"];
        let mine = owned_by("a", &pair);
        let theirs = owned_by("b", &["a", "b"]);
        let secs = Duration::from_secs;

        // 13. Partitioned from NATS: its lease may have lapsed and the other member may have
        //     backfilled its things already. It abandons everything it streams or still
        //     holds: stopped, held no more, not sealed (that would store twice what the new
        //     owner stored), its sinks' share forsaken; it claims nothing until it is back.
        let mut member = Member::new(&[&mine, &theirs]);
        member.streaming = BTreeSet::from([mine.clone(), theirs.clone()]);
        let turn = member.turn(&view(&pair, &[&mine, &theirs], &[]), secs(0));
        assert_eq!(decision(&turn, &theirs), Some(Decision::Stop));
        let cut_off = View {
            connected: false,
            ..view(&pair, &[&mine], &[])
        };
        let turn = member.turn(&cut_off, secs(1));
        assert_eq!(decision(&turn, &mine), Some(Decision::Abandon));
        assert_eq!(decision(&turn, &theirs), Some(Decision::Abandon));
        let mut both = vec![mine.as_str(), theirs.as_str()];
        both.sort_unstable();
        assert_eq!(turn.to_forsake(), both);
        assert!(!turn.sinks_should_seal() && turn.holding.is_empty());
        assert!(member.streaming.is_empty() && !turn.claimed_now);
        let turn = member.turn(&cut_off, secs(2));
        assert!(turn.decisions.is_empty(), "abandoned once: {turn:?}");

        // 14. Back before it was released: owned again, it is claimed like any other thing
        //     (another member may have started it meanwhile).
        let turn = member.turn(&view(&pair, &[&mine], &[(&mine, "b")]), secs(1));
        assert_eq!(
            decision(&turn, &mine),
            Some(Decision::Wait {
                holder: "b".to_owned()
            })
        );
    }
}
