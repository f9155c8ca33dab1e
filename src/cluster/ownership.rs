//! Who owns which thing: rendezvous (highest-random-weight) hashing over the live members.
//!
//! Every member computes the same answer from the same member list, with no coordination:
//! a thing goes to the member with the highest weight for the pair. When a member joins, only
//! the things it now wins move (to it); when one leaves, only its own things move, each to
//! the member that was second for it. The hash is fixed here (not `std`'s, which may change
//! between Rust versions) so members built by different compilers agree.

/// The weight of `member` for `thing`: FNV-1a over both names, finished with SplitMix64's
/// mixer so that close names spread.
fn weight(member: &str, thing: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |byte: u8| {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    };
    member.bytes().for_each(&mut eat);
    // A separator no name contains, so ("ab", "c") and ("a", "bc") differ.
    eat(0xff);
    thing.bytes().for_each(&mut eat);
    let mut mixed = hash;
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    mixed ^ (mixed >> 31)
}

/// The member that owns `thing` among `members`, or `None` when there are none.
pub fn owner_of<'a>(thing: &str, members: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    members
        .into_iter()
        .max_by(|a, b| weight(a, thing).cmp(&weight(b, thing)).then(b.cmp(a)))
}

/// Each member's things, in the order given.
pub fn assign<'a>(
    things: impl IntoIterator<Item = &'a str>,
    members: &[&'a str],
) -> std::collections::BTreeMap<&'a str, Vec<&'a str>> {
    let mut owned: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for thing in things {
        if let Some(owner) = owner_of(thing, members.iter().copied()) {
            owned.entry(owner).or_default().push(thing);
        }
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn things(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("S5D9-{i:04}")).collect()
    }

    fn owners(things: &[String], members: &[&str]) -> HashMap<String, String> {
        things
            .iter()
            .map(|t| {
                let owner = owner_of(t, members.iter().copied()).unwrap();
                (t.clone(), owner.to_owned())
            })
            .collect()
    }

    #[test]
    fn no_members_own_nothing_and_one_member_owns_everything() {
        assert_eq!(owner_of("a", []), None);
        assert_eq!(owner_of("a", ["only"]), Some("only"));
    }

    #[test]
    fn the_answer_does_not_depend_on_the_order_of_members() {
        let fleet = things(200);
        assert_eq!(
            owners(&fleet, &["a", "b", "c"]),
            owners(&fleet, &["c", "a", "b"])
        );
    }

    #[test]
    fn a_join_moves_only_things_to_the_newcomer_about_a_quarter() {
        let fleet = things(2000);
        let before = owners(&fleet, &["worker-a", "worker-b", "worker-c"]);
        let after = owners(&fleet, &["worker-a", "worker-b", "worker-c", "worker-d"]);
        let moved: Vec<_> = fleet.iter().filter(|t| before[*t] != after[*t]).collect();
        assert!(moved.iter().all(|t| after[*t] == "worker-d"));
        let share = moved.len() as f64 / fleet.len() as f64;
        assert!((0.2..0.3).contains(&share), "moved {share}");
    }

    #[test]
    fn a_loss_moves_only_the_lost_members_things() {
        let fleet = things(2000);
        let before = owners(&fleet, &["worker-a", "worker-b", "worker-c"]);
        let after = owners(&fleet, &["worker-a", "worker-c"]);
        for thing in &fleet {
            if before[thing] != "worker-b" {
                assert_eq!(before[thing], after[thing], "{thing} moved needlessly");
            }
        }
        let counts = ["worker-a", "worker-b", "worker-c"]
            .map(|m| before.values().filter(|o| *o == m).count());
        assert!(counts.iter().all(|c| (550..780).contains(c)), "{counts:?}");
    }

    #[test]
    fn weights_are_fixed_across_builds() {
        // A member built by another compiler must agree: the hash is ours, not std's.
        assert_eq!(weight("worker-a", "S5D9-0001"), 17_878_953_888_140_701_262);
        assert_ne!(weight("ab", "c"), weight("a", "bc"));
        assert_eq!(owner_of("S5D9-0001", ["worker-a", "worker-b"]), {
            let a = weight("worker-a", "S5D9-0001");
            let b = weight("worker-b", "S5D9-0001");
            Some(if a >= b { "worker-a" } else { "worker-b" })
        });
    }
}
