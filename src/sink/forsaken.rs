//! Fencing for a sink shared by a cluster: the things this member gave up before all it
//! emitted of them was durable here, which it must not store any more.
//!
//! A member that may have lost its lease, or that gave up a handover its sinks could not
//! finish, no longer knows what the new owner stored: the new owner has read what was durable
//! here and backfilled the rest from the source. Sealing or publishing those records now would
//! store them twice in a shared destination. So they are dropped here (the source and the new
//! owner have them), until the thing comes back and the sink has read the others' files.

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// The forsaken things; shared by the worker's handle and a sink's loop.
#[derive(Debug, Default)]
pub struct Forsaken {
    /// Whether `things` holds any: the sinks ask per record, and nearly always it holds none.
    any: AtomicBool,
    things: Mutex<HashSet<String>>,
    /// Things that came back, to be lifted once the loop has looked at its destination again.
    returned: Mutex<Vec<String>>,
}

impl Forsaken {
    /// `thing`'s records are no longer this member's to store.
    pub fn forsake(&self, thing: &str) {
        lock(&self.things).insert(thing.to_owned());
        self.any.store(true, Ordering::SeqCst);
    }

    /// Whether `thing`'s records are forsaken.
    pub fn skips(&self, thing: &str) -> bool {
        self.any.load(Ordering::SeqCst) && lock(&self.things).contains(thing)
    }

    /// `things` moved back here: lifted by [`Forsaken::lift_returned`], which the loop calls
    /// once it has read what the others stored (so what they hold is skipped as held).
    pub fn returned(&self, things: &[String]) {
        lock(&self.returned).extend(things.iter().cloned());
    }

    /// Lifts the fence of the things that came back.
    pub fn lift_returned(&self) {
        let returned = std::mem::take(&mut *lock(&self.returned));
        if !returned.is_empty() {
            let mut things = lock(&self.things);
            for thing in &returned {
                things.remove(thing);
            }
            self.any.store(!things.is_empty(), Ordering::SeqCst);
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forsaken_thing_is_skipped_until_it_returns_and_the_loop_looked_again() {
        let forsaken = Forsaken::default();
        assert!(!forsaken.skips("a") && forsaken.is_empty());
        forsaken.forsake("a");
        forsaken.forsake("b");
        assert!(forsaken.skips("a") && forsaken.skips("b") && !forsaken.skips("c"));
        forsaken.returned(&["a".to_owned()]);
        assert!(
            forsaken.skips("a"),
            "lifted only once the loop looked again"
        );
        forsaken.lift_returned();
        assert!(!forsaken.skips("a") && forsaken.skips("b"));
    }
}
