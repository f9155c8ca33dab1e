//! The shape of the last content a normaliser walked: its text, and where each value that can
//! change sat in it (numbers, booleans and strings, not names).
//!
//! A board sends the same content dweet after dweet with only its values changed. The next
//! content is then read by comparing the text between those values with the last one's and
//! reading the values in their places, without walking it: a third of the walk's cost, and
//! the readings come out under the last content's names, so names cost nothing either. The
//! answer is the walk's: the text around the values is that of content the walk accepted, and
//! each value is read by the walk's own parsers. No number, string or literal can end where
//! the text goes on (a comma, a bracket or a space comes next), so values of any length fit
//! their places. Anything else (other text, another kind of value in a place, a value that
//! does not parse, a number that is not finite) makes `read` answer `None`, and the content
//! is walked.

use std::sync::Arc;

use super::leaves::{Held, Slot, number, string};
use crate::record::Reading;

#[derive(Debug, Default)]
pub(super) struct Shape {
    /// The content's text, exactly as far as its end; empty when there is no shape to match.
    text: String,
    /// Where each value sat in `text`, in document order.
    slots: Vec<Slot>,
    /// The names of its readings, one for each slot that holds one.
    names: Vec<Arc<str>>,
}

impl Shape {
    /// The readings of the content at the start of `text`, named as the last content's were,
    /// and where it ends; `None` when it is not of this shape.
    pub(super) fn read(&self, text: &str) -> Option<(Vec<Reading>, usize)> {
        if self.text.is_empty() {
            return None;
        }
        let (shape, bytes) = (self.text.as_bytes(), text.as_bytes());
        let mut readings = Vec::with_capacity(self.names.len());
        let mut names = self.names.iter();
        let (mut from, mut at) = (0, 0);
        for slot in &self.slots {
            at = matching(bytes, at, &shape[from..slot.start])?;
            from = slot.end;
            let value = match slot.kind {
                Held::Text => {
                    string(bytes, &mut at).ok()?;
                    None
                }
                kind => Some(reading_at(kind, bytes, &mut at)?),
            };
            if let Some(value) = value {
                let sensor = Arc::clone(names.next()?);
                readings.push(Reading { sensor, value });
            }
        }
        let end = matching(bytes, at, &shape[from..])?;
        Some((readings, end))
    }

    /// Keeps `text`, which the walk read as far as its end, with the walk's `slots` and the
    /// `readings` it found there, one for each slot that holds one.
    pub(super) fn keep(&mut self, text: &str, slots: Vec<Slot>, readings: &[Reading]) {
        self.text.clear();
        self.text.push_str(text);
        self.slots = slots;
        self.names.clear();
        self.names
            .extend(readings.iter().map(|reading| Arc::clone(&reading.sensor)));
    }

    pub(super) fn forget(&mut self) {
        self.text.clear();
    }
}

/// When a reader tries its shape: on every content or frame while the shape fits, and after
/// four misses in a row on one in 64, the shape built anew from each one tried. A thing whose
/// every dweet has a new shape (two kinds of board interleaved in one import, a string that
/// needs escapes in every frame) pays for few failed tries and few shapes built.
#[derive(Debug, Default)]
pub(super) struct Tries {
    misses: u32,
}

impl Tries {
    pub(super) fn due(&self) -> bool {
        self.misses < 4 || self.misses.is_multiple_of(64)
    }

    pub(super) fn fitted(&mut self) {
        self.misses = 0;
    }

    pub(super) fn missed(&mut self) {
        self.misses = self.misses.wrapping_add(1);
    }
}

/// The reading a slot of `kind` (a number or a boolean) finds at `*at` in `bytes`, stepping
/// past it; `None` for anything else there: another kind of value, a number that does not
/// parse or is not finite.
#[inline]
pub(super) fn reading_at(kind: Held, bytes: &[u8], at: &mut usize) -> Option<f64> {
    match kind {
        // What does not start a number (a string, a literal) is refused by the number's
        // own grammar.
        Held::Number => number(bytes, at).ok().filter(|value| value.is_finite()),
        Held::Boolean => {
            let (value, length) = match bytes.get(*at..)? {
                [b't', b'r', b'u', b'e', ..] => (1.0, 4),
                [b'f', b'a', b'l', b's', b'e', ..] => (0.0, 5),
                _ => return None,
            };
            *at += length;
            Some(value)
        }
        Held::Text => None,
    }
}

/// Where `bytes` goes on after `expected` when it holds `expected` at `at`.
#[inline]
pub(super) fn matching(bytes: &[u8], at: usize, expected: &[u8]) -> Option<usize> {
    let end = at + expected.len();
    same(bytes.get(at..end)?, expected).then_some(end)
}

/// Whether two slices of the same length are equal, compared inline: the text between two
/// values is a dozen bytes or so, and a call to `memcmp` for each cost more than the compare.
/// Eight bytes at a time, the last eight overlapping the ones before; four and then one at a
/// time below eight.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    fn word(bytes: &[u8], at: usize) -> u64 {
        bytes
            .get(at..at + 8)
            .and_then(|word| word.try_into().ok())
            .map_or(0, u64::from_ne_bytes)
    }
    fn half(bytes: &[u8], at: usize) -> u32 {
        bytes
            .get(at..at + 4)
            .and_then(|word| word.try_into().ok())
            .map_or(0, u32::from_ne_bytes)
    }
    let length = a.len();
    if length != b.len() {
        return false;
    }
    if length >= 8 {
        let mut at = 0;
        while at + 8 < length {
            if word(a, at) != word(b, at) {
                return false;
            }
            at += 8;
        }
        word(a, length - 8) == word(b, length - 8)
    } else if length >= 4 {
        half(a, 0) == half(b, 0) && half(a, length - 4) == half(b, length - 4)
    } else {
        a.iter().zip(b).all(|(x, y)| x == y)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::Normalizer;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// An S5D9 content with every kind of value; the places of values that change are marked
    /// by kind: `{N}` a number, `{B}` a boolean, `{T}` a string.
    const TEMPLATE: &str = r#"{"globals":{"application":{T},"dweet-count":{N}},"sensors":{"AccelX":{N},"AccelY":{N},"LED":{N},"On":{B},"Off":{B},"Note":null,"Pair":[{N},{T},{N}],"MagZ":{N}}}"#;

    /// What `normalizer`'s walk makes of `text`: the readings (name and value's bits) and
    /// where the content ends, or why it stopped.
    fn walked(
        normalizer: &mut Normalizer,
        text: &str,
    ) -> Result<(Vec<(String, u64)>, usize), String> {
        normalizer
            .walk(text)
            .map(|(readings, end)| {
                let readings = readings
                    .iter()
                    .map(|r| (r.sensor.to_string(), r.value.to_bits()))
                    .collect();
                (readings, end)
            })
            .map_err(|stop| stop.reason())
    }

    /// A value of `kind` for its place: one a board sends, or now and then one that is not of
    /// the kind, or not JSON at all.
    fn value(kind: &str, rng: &mut StdRng) -> String {
        let odd = [
            "0",
            "-0",
            "-0.0",
            "7",
            "-12.75",
            "1e5",
            "1E-3",
            "2.5e+2",
            "12345678901234567890",
            "0.1234567890123456789",
            "1e400",
            "-1e400",
            "01",
            "1.",
            ".5",
            "-",
            "1e",
            "+1",
            "1-2",
            r#""7""#,
            "true",
            "false",
            "tru",
            "falsey",
            "null",
            "[1]",
            "{}",
            r#""a\"b""#,
            r#""\u00e9t\u00e9""#,
            r#""\x""#,
            "\"a\u{1}\"",
            r#""open"#,
            r#""\\""#,
        ];
        if rng.random_range(0..40) == 0 {
            return odd[rng.random_range(0..odd.len())].to_owned();
        }
        match kind {
            "N" if rng.random_bool(0.5) => rng.random_range(-1_000_000i64..1_000_000).to_string(),
            "N" => format!("{:.2}", rng.random_range(-100.0..100.0)),
            "B" => rng.random_bool(0.5).to_string(),
            _ => format!("{:?}", &"DweetS5D9Client"[..rng.random_range(0..16)]),
        }
    }

    pub(in crate::normalize) fn content(rng: &mut StdRng) -> String {
        let mut text = String::new();
        let mut rest = TEMPLATE;
        while let Some(at) = ["{N}", "{B}", "{T}"]
            .iter()
            .filter_map(|mark| rest.find(mark))
            .min()
        {
            text.push_str(&rest[..at]);
            text.push_str(&value(&rest[at + 1..at + 2], rng));
            rest = &rest[at + 3..];
        }
        text.push_str(rest);
        text
    }

    /// The inline compare says what slice equality says, at every length around its word
    /// sizes, with the two slices equal or apart in any one byte.
    #[test]
    fn the_inline_compare_agrees_with_slice_equality() {
        let mut rng = StdRng::seed_from_u64(8);
        for length in 0..40 {
            for _ in 0..200 {
                let a: Vec<u8> = (0..length).map(|_| rng.random_range(b'a'..b'e')).collect();
                let mut b = a.clone();
                if length > 0 && rng.random_bool(0.7) {
                    let at = rng.random_range(0..length);
                    b[at] = rng.random_range(b'a'..b'e');
                }
                assert_eq!(super::same(&a, &b), a == b, "{a:?} {b:?}");
            }
            let shorter = vec![b'a'; length];
            assert!(
                !super::same(&shorter, &[b'a'; 40][..length + 1]),
                "lengths differ"
            );
        }
    }

    /// A normaliser that has seen one content keeps reading others as a fresh one walks them,
    /// whatever is in the places of its values and whatever else changes.
    #[test]
    fn a_content_read_by_its_shape_is_read_as_the_walk_reads_it() {
        let mut rng = StdRng::seed_from_u64(26);
        let mut kept = Normalizer::default();
        let (mut by_shape, mut walked_again) = (0, 0);
        for round in 0..20_000 {
            let mut text = content(&mut rng);
            // Some damage elsewhere, a content of another shape now and then, and text
            // after the content as a line has it.
            if round % 7 == 0 {
                let at = rng.random_range(0..text.len());
                let byte = b"{}[]\":,.-e0 tn\\"[rng.random_range(0..15)];
                if text.is_char_boundary(at) {
                    text.insert(at, char::from(byte));
                }
            }
            if round % 97 == 0 {
                text = r#"{"a":1,"b":{"c":2},"a":3}"#.to_owned();
            }
            text.push_str(r#","created":"x"}"#);
            let expected = walked(&mut Normalizer::default(), &text);
            let fits = kept.shape.read(&text).is_some();
            assert_eq!(walked(&mut kept, &text), expected, "{text}");
            if fits {
                by_shape += 1;
            } else {
                walked_again += 1;
            }
        }
        assert!(
            by_shape > 8_000,
            "many contents were read by their shape: {by_shape}"
        );
        assert!(walked_again > 5_000, "and the rest walked: {walked_again}");
    }
}
