//! "Is this already stored?", answered one way everywhere: per thing, the newest `created`
//! (ms) a place holds. Each thing's dweets arrive oldest first, so a dweet at or below its
//! thing's mark is held, and exactly once rests on that.
//!
//! Every sink keeps one (Parquet over its sealed generations, PostgreSQL in `things`, the
//! JetStream output per subject), the backlog keeps what its sink made durable in this run,
//! and the worker starts each thing at the lowest mark over the sinks. The subscription keeps
//! its own per thing as an atomic, shared with the worker across restarts of its task.

use std::collections::HashMap;
use std::collections::hash_map;

use serde::{Deserialize, Serialize};

/// Names hashed by foldhash, seeded per process as std's SipHash is: the Parquet sink looks
/// each dweet's thing up here two or three times, and SipHash cost 512 instructions a dweet
/// more (`run_pipeline`, issue 26).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Watermarks(HashMap<String, i64, foldhash::fast::RandomState>);

impl Watermarks {
    pub fn new() -> Self {
        Self::default()
    }

    /// `thing`'s mark, if it has one.
    pub fn get(&self, thing: &str) -> Option<i64> {
        self.0.get(thing).copied()
    }

    /// Raises `thing`'s mark to `created_ms`; never lowers it. The name is copied only for a
    /// thing not marked yet (the hot path raises marks of known things).
    pub fn raise(&mut self, thing: &str, created_ms: i64) {
        match self.0.get_mut(thing) {
            Some(mark) => *mark = (*mark).max(created_ms),
            None => {
                self.0.insert(thing.to_owned(), created_ms);
            }
        }
    }

    /// Raises `thing`'s mark to `created_ms` if that is above it (or it has none), and says
    /// whether it was: one lookup where `holds` and then `raise` took two.
    pub fn raise_if_newer(&mut self, thing: &str, created_ms: i64) -> bool {
        match self.0.get_mut(thing) {
            Some(mark) if created_ms <= *mark => false,
            Some(mark) => {
                *mark = created_ms;
                true
            }
            None => {
                self.0.insert(thing.to_owned(), created_ms);
                true
            }
        }
    }

    /// Sets `thing`'s mark to what its destination says it holds, lower or not.
    pub fn set(&mut self, thing: String, created_ms: i64) {
        self.0.insert(thing, created_ms);
    }

    /// Whether a dweet of `thing` at `created_ms` is held: at or below the thing's mark.
    pub fn holds(&self, thing: &str, created_ms: i64) -> bool {
        self.get(thing).is_some_and(|mark| created_ms <= mark)
    }

    /// Raises each mark of `other` into these.
    pub fn raise_all(&mut self, other: impl IntoIterator<Item = (String, i64)>) {
        for (thing, created_ms) in other {
            let mark = self.0.entry(thing).or_insert(created_ms);
            *mark = (*mark).max(created_ms);
        }
    }

    /// Per thing, the lowest mark over several places: where each thing starts so that the
    /// place furthest behind gets what it misses. A thing missing from any place has none
    /// (it starts from whatever the source keeps); no places, no marks.
    pub fn lowest_of<'a>(places: impl IntoIterator<Item = &'a Watermarks>) -> Watermarks {
        let places: Vec<&Watermarks> = places.into_iter().collect();
        let Some((first, rest)) = places.split_first() else {
            return Watermarks::new();
        };
        first
            .iter()
            .filter_map(|(thing, mark)| {
                let lowest = rest
                    .iter()
                    .map(|other| other.get(thing))
                    .try_fold(mark, |low, other| other.map(|o| low.min(o)))?;
                Some((thing.to_owned(), lowest))
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, i64)> {
        self.0.iter().map(|(thing, mark)| (thing.as_str(), *mark))
    }
}

impl FromIterator<(String, i64)> for Watermarks {
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(pairs: I) -> Self {
        let mut marks = Watermarks::new();
        marks.raise_all(pairs);
        marks
    }
}

impl IntoIterator for Watermarks {
    type Item = (String, i64);
    type IntoIter = hash_map::IntoIter<String, i64>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(pairs: &[(&str, i64)]) -> Watermarks {
        pairs.iter().map(|(t, m)| ((*t).to_owned(), *m)).collect()
    }

    #[test]
    fn raise_never_lowers_and_holds_is_at_or_below() {
        /// Marks raised in order, the dweet asked about, whether it is held.
        type Case<'a> = (&'a [(&'a str, i64)], (&'a str, i64), bool);
        let cases: &[Case] = &[
            // (raised in order, asked, held)
            (&[], ("a", 1), false),
            (&[("a", 5)], ("a", 5), true),
            (&[("a", 5)], ("a", 4), true),
            (&[("a", 5)], ("a", 6), false),
            (&[("a", 5), ("a", 3)], ("a", 4), true),
            (&[("a", 5)], ("b", 1), false),
            (&[("a", 5), ("b", 9), ("a", 7)], ("a", 7), true),
        ];
        for (raised, (thing, at), held) in cases {
            let mut watermarks = Watermarks::new();
            for (t, m) in *raised {
                watermarks.raise(t, *m);
            }
            assert_eq!(
                watermarks.holds(thing, *at),
                *held,
                "{raised:?} asked {thing}@{at}"
            );
            // raise_if_newer answers the opposite of holds and leaves the marks as raise.
            let mut raised_after = watermarks.clone();
            raised_after.raise(thing, *at);
            assert_eq!(
                watermarks.raise_if_newer(thing, *at),
                !*held,
                "{raised:?} raised if newer {thing}@{at}"
            );
            assert_eq!(watermarks, raised_after, "{raised:?} then {thing}@{at}");
        }
        let mut lowered = marks(&[("a", 5)]);
        lowered.set("a".to_owned(), 2);
        assert_eq!(
            lowered.get("a"),
            Some(2),
            "set is what the destination says"
        );
    }

    #[test]
    fn a_thing_starts_at_the_lowest_mark_and_only_when_every_place_knows_it() {
        let parquet = marks(&[("a", 10), ("b", 5), ("c", 7)]);
        let postgres = marks(&[("a", 8), ("b", 9)]);
        let cases: &[(&[&Watermarks], Watermarks)] = &[
            (&[&parquet, &postgres], marks(&[("a", 8), ("b", 5)])),
            (&[&postgres, &parquet], marks(&[("a", 8), ("b", 5)])),
            (&[&parquet], parquet.clone()),
            (&[&parquet, &Watermarks::new()], Watermarks::new()),
            (&[], Watermarks::new()),
        ];
        for (places, lowest) in cases {
            assert_eq!(&Watermarks::lowest_of(places.iter().copied()), lowest);
        }
    }

    #[test]
    fn the_text_form_is_a_plain_object_as_footers_store_it() {
        let text = serde_json::to_string(&marks(&[("a", 1)])).unwrap_or_default();
        assert_eq!(text, r#"{"a":1}"#);
        let read: Watermarks = serde_json::from_str(r#"{"a":1,"b":2}"#).unwrap_or_default();
        assert_eq!(read, marks(&[("a", 1), ("b", 2)]));
    }
}
