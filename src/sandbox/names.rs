//! Thing names for `/dweet`, which dweets to a thing the server names: `adjective-noun`, the
//! style the public service used (`smelly-fire`, `wooden-jewel`).

use rand::Rng;
use rand::seq::IndexedRandom;

const ADJECTIVES: &[&str] = &[
    "ancient", "bitter", "brave", "bright", "calm", "clever", "cold", "crisp", "curly", "damp",
    "dark", "dizzy", "eager", "early", "faint", "fancy", "fierce", "fluffy", "gentle", "giant",
    "glossy", "golden", "grumpy", "hollow", "humble", "icy", "jolly", "lazy", "little", "loud",
    "lucky", "misty", "muddy", "noisy", "odd", "pale", "plain", "proud", "quick", "quiet", "rapid",
    "rusty", "shiny", "silent", "silly", "sleepy", "slow", "smelly", "snowy", "soft", "sour",
    "spicy", "steady", "stormy", "sunny", "swift", "tall", "tame", "tiny", "wild", "windy", "wise",
    "wooden", "young",
];

const NOUNS: &[&str] = &[
    "anchor", "apple", "badge", "bear", "bell", "bird", "boat", "branch", "bread", "brick",
    "bridge", "cake", "candle", "cloud", "coat", "comet", "crow", "dream", "drum", "feather",
    "fire", "flame", "flower", "fog", "forest", "frog", "garden", "ghost", "glove", "harbor",
    "hill", "horse", "island", "jewel", "kettle", "kite", "lake", "lamp", "leaf", "meadow", "moon",
    "mountain", "nest", "ocean", "owl", "pebble", "pond", "rain", "river", "rock", "sea", "shadow",
    "sky", "snow", "spark", "star", "stone", "storm", "sun", "tree", "wave", "whale", "wind",
    "wolf",
];

/// A random `adjective-noun` name; past the first few collisions a number is appended so that
/// a busy server never runs out of names.
pub fn generate(rng: &mut impl Rng, attempt: u32) -> String {
    let adjective = ADJECTIVES.choose(rng).copied().unwrap_or("odd");
    let noun = NOUNS.choose(rng).copied().unwrap_or("thing");
    if attempt < 4 {
        format!("{adjective}-{noun}")
    } else {
        format!("{adjective}-{noun}-{}", rng.random_range(0..1_000_000u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_adjective_dash_noun() {
        let mut rng = rand::rng();
        let name = generate(&mut rng, 0);
        let (adjective, noun) = name.split_once('-').unwrap();
        assert!(
            ADJECTIVES.contains(&adjective) && NOUNS.contains(&noun),
            "{name}"
        );
        assert_eq!(generate(&mut rng, 9).split('-').count(), 3);
    }
}
