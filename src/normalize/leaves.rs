//! The numeric leaves of a content's JSON text, found in one pass without building a tree.
//!
//! This is the ingest path's hot loop, so it is a small scanner rather than a serde visitor:
//! it finds values, names them by their dotted path and parses numbers the way serde_json
//! does (integers exactly, floats correctly rounded). It also holds the text to JSON's
//! grammar, so that a common dweet line, an import's or a listen stream's, needs no other
//! check of its content ([`super::line`]): text it stops at as `NotJson` is never JSON, and
//! JSON deeper or wider than the limits stops it as `TooDeep` or `TooMany`.

use std::sync::Arc;

use super::{MAX_DEPTH, MAX_READINGS};
use crate::protocol::first_special;
use crate::record::Reading;

/// Why a walk stopped. Small and `Copy`, so the scanner's many returns stay cheap; the text
/// is written once, for the dead letter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Stop {
    NotJson { at: usize },
    TooDeep,
    TooMany,
}

impl Stop {
    pub(super) fn reason(self) -> String {
        match self {
            Stop::NotJson { at } => format!("the content is not valid JSON at byte {at}"),
            Stop::TooDeep => format!("the content nests deeper than {MAX_DEPTH} levels"),
            Stop::TooMany => format!("the content has more than {MAX_READINGS} numeric values"),
        }
    }
}

/// The readings of the JSON value at the start of `text`, in document order; whether every
/// sensor name was reused from `known` (the previous dweet's names, reused where the same
/// path comes at the same place); and where the value ends. `path` is scratch space and
/// starts empty; `slots` is cleared and gets where each value that can change sits in `text`
/// (one slot per reading, and one per string that is not a name), for [`super::shape`].
pub(super) fn walk(
    text: &str,
    known: &[Arc<str>],
    path: &mut String,
    slots: &mut Vec<Slot>,
) -> Result<(Vec<Reading>, bool, usize), Stop> {
    slots.clear();
    let mut scanner = Scanner {
        json: text,
        text: text.as_bytes(),
        at: 0,
        path,
        readings: Vec::with_capacity(known.len()),
        slots,
        known,
        all_known: true,
    };
    scanner.value(0)?;
    Ok((scanner.readings, scanner.all_known, scanner.at))
}

/// Where a value that can change from one dweet to the next sits in the text the walk read:
/// a reading's, or a string's.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slot {
    pub kind: Held,
    pub start: usize,
    pub end: usize,
}

/// What a [`Slot`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// A number: a reading.
    Number,
    /// `true` or `false`: a reading of 1 or 0.
    Boolean,
    /// A string (not a name): no reading.
    Text,
}

struct Scanner<'t, 'p, 's, 'k> {
    json: &'t str,
    text: &'t [u8],
    at: usize,
    path: &'p mut String,
    readings: Vec<Reading>,
    slots: &'s mut Vec<Slot>,
    known: &'k [Arc<str>],
    all_known: bool,
}

impl Scanner<'_, '_, '_, '_> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    fn broken(&self) -> Stop {
        Stop::NotJson { at: self.at }
    }

    fn expect(&mut self, byte: u8) -> Result<(), Stop> {
        self.skip_space();
        if self.peek() != Some(byte) {
            return Err(self.broken());
        }
        self.at += 1;
        Ok(())
    }

    /// One value at `depth` (the content object itself is depth 0).
    fn value(&mut self, depth: usize) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::TooDeep);
        }
        self.skip_space();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => {
                let start = self.at;
                self.string()?;
                let end = self.at;
                self.slots.push(Slot {
                    kind: Held::Text,
                    start,
                    end,
                });
                Ok(())
            }
            Some(b't') => self.literal(b"true", Some(1.0)),
            Some(b'f') => self.literal(b"false", Some(0.0)),
            Some(b'n') => self.literal(b"null", None),
            Some(b'-' | b'0'..=b'9') => {
                let start = self.at;
                let value = number(self.text, &mut self.at)?;
                let end = self.at;
                self.reading(
                    value,
                    Slot {
                        kind: Held::Number,
                        start,
                        end,
                    },
                )
            }
            _ => Err(self.broken()),
        }
    }

    fn literal(&mut self, word: &[u8], number: Option<f64>) -> Result<(), Stop> {
        if !self.text[self.at..].starts_with(word) {
            return Err(self.broken());
        }
        let start = self.at;
        self.at += word.len();
        let end = self.at;
        number.map_or(Ok(()), |value| {
            let kind = Held::Boolean;
            self.reading(value, Slot { kind, start, end })
        })
    }

    fn object(&mut self, depth: usize) -> Result<(), Stop> {
        if self.empty(b'}') {
            return Ok(());
        }
        let parent = self.path.len();
        loop {
            self.skip_space();
            let (key, escaped) = self.string()?;
            if !self.path.is_empty() {
                self.path.push('.');
            }
            // The quotes are ASCII, so the text between them is whole characters.
            let name = self.json.get(key.0..key.1).ok_or_else(|| self.broken())?;
            if escaped {
                let quoted = self.json.get(key.0 - 1..key.1 + 1).unwrap_or_default();
                let name: String = serde_json::from_str(quoted).map_err(|_| self.broken())?;
                self.path.push_str(&name);
            } else {
                self.path.push_str(name);
            }
            self.expect(b':')?;
            self.value(depth + 1)?;
            self.path.truncate(parent);
            if !self.another(b'}')? {
                return Ok(());
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), Stop> {
        if self.empty(b']') {
            return Ok(());
        }
        let parent = self.path.len();
        let mut index = 0usize;
        loop {
            if !self.path.is_empty() {
                self.path.push('.');
            }
            self.path.push_str(itoa(index, &mut [0; 20]));
            self.value(depth + 1)?;
            self.path.truncate(parent);
            if !self.another(b']')? {
                return Ok(());
            }
            index += 1;
        }
    }

    /// Steps past an object's or array's opening; `true` when `close` follows at once.
    fn empty(&mut self, close: u8) -> bool {
        self.at += 1;
        self.skip_space();
        let empty = self.peek() == Some(close);
        if empty {
            self.at += 1;
        }
        empty
    }

    /// After a member of an object or array: `true` past a comma (another member follows),
    /// `false` past the `close` that ends it.
    fn another(&mut self, close: u8) -> Result<bool, Stop> {
        self.skip_space();
        match self.peek() {
            Some(b',') => {
                self.at += 1;
                Ok(true)
            }
            Some(byte) if byte == close => {
                self.at += 1;
                Ok(false)
            }
            _ => Err(self.broken()),
        }
    }

    /// Skips a string; returns the byte range of its text between the quotes and whether
    /// that text holds escapes.
    fn string(&mut self) -> Result<((usize, usize), bool), Stop> {
        string(self.text, &mut self.at)
    }

    fn reading(&mut self, value: f64, slot: Slot) -> Result<(), Stop> {
        if !value.is_finite() {
            return Ok(());
        }
        if self.readings.len() >= MAX_READINGS {
            return Err(Stop::TooMany);
        }
        let sensor = match self.known.get(self.readings.len()) {
            Some(known) if **known == **self.path => Arc::clone(known),
            _ => {
                self.all_known = false;
                Arc::from(self.path.as_str())
            }
        };
        self.readings.push(Reading { sensor, value });
        self.slots.push(slot);
        Ok(())
    }
}

/// The number whose text starts at `*at` in `text`, as serde_json reads it: integers that fit
/// 64 bits exactly (then rounded to the nearest double), everything else correctly rounded
/// from its decimal text. `*at` moves past the number's text (past what was scanned, when it
/// is not a number).
///
/// Inlined where it is called: nearly every number is a plain decimal, read in one pass with
/// no call (a shape reads a dozen a dweet); anything else takes the full path.
#[inline]
pub(super) fn number(text: &[u8], at: &mut usize) -> Result<f64, Stop> {
    match plain_decimal(text, *at) {
        Some((value, end)) => {
            *at = end;
            Ok(value)
        }
        None => number_in_full(text, at),
    }
}

/// The value of the plain decimal JSON has at `at` (an optional minus, at most 19 digits with
/// no leading zero, at most one point with digits after it, nothing that continues a number
/// after it) and where its text ends, when the exact parse is one operation: an integer
/// converted, or an exact mantissa divided by an exact power of ten, one correctly rounded
/// division (Clinger's fast path).
#[inline]
fn plain_decimal(text: &[u8], at: usize) -> Option<(f64, usize)> {
    let negative = text.get(at) == Some(&b'-');
    let digits = at + usize::from(negative);
    // Past 19 digits the mantissa wraps; such a number is refused below.
    let mut mantissa = 0u64;
    let mut end = fold_digits(text, digits, &mut mantissa);
    let whole = end - digits;
    if whole == 0 || (whole > 1 && text[digits] == b'0') {
        return None;
    }
    let mut places = 0;
    if text.get(end) == Some(&b'.') {
        let fraction = end + 1;
        end = fold_digits(text, fraction, &mut mantissa);
        places = end - fraction;
        if places == 0 {
            return None;
        }
    }
    if whole + places > 19 || continues_a_number(text.get(end).copied()) {
        return None;
    }
    let magnitude = if places == 0 {
        // An integer zero has no sign: "-0" is +0.0 (serde_json's `Value` says -0.0).
        if mantissa == 0 {
            return Some((0.0, end));
        }
        mantissa as f64
    } else if mantissa <= 1 << 53 && places < EXACT_POWERS_OF_TEN.len() {
        mantissa as f64 / EXACT_POWERS_OF_TEN[places]
    } else {
        return None;
    };
    Some((if negative { -magnitude } else { magnitude }, end))
}

/// Folds the digits of `text` from `at` into `mantissa` (wrapping past 19 digits, which the
/// caller refuses); where they end.
#[inline]
fn fold_digits(text: &[u8], mut at: usize, mantissa: &mut u64) -> usize {
    while let Some(digit) = text.get(at).map(|byte| byte.wrapping_sub(b'0'))
        && digit < 10
    {
        *mantissa = mantissa.wrapping_mul(10).wrapping_add(u64::from(digit));
        at += 1;
    }
    at
}

/// [`number`] for what is not a plain decimal: the text is scanned on, held to the whole
/// grammar, then parsed.
#[inline(never)]
fn number_in_full(text: &[u8], at: &mut usize) -> Result<f64, Stop> {
    let start = *at;
    if text.get(*at) == Some(&b'-') {
        *at += 1;
    }
    let digits = *at;
    while continues_a_number(text.get(*at).copied()) {
        *at += 1;
    }
    if !is_json_number(&text[digits..*at]) {
        return Err(Stop::NotJson { at: start });
    }
    // The grammar held, so the text is ASCII.
    std::str::from_utf8(&text[start..*at])
        .ok()
        .and_then(|number| number.parse::<f64>().ok())
        .ok_or(Stop::NotJson { at: *at })
}

/// Steps `*at` past the string that starts there; returns the byte range of its text between
/// the quotes and whether that text holds escapes. What is not a whole string stops where it
/// starts, or at a raw control character in it.
pub(super) fn string(text: &[u8], at: &mut usize) -> Result<((usize, usize), bool), Stop> {
    let broken = Stop::NotJson { at: *at };
    if text.get(*at) != Some(&b'"') {
        return Err(broken);
    }
    let start = *at + 1;
    let mut end = start;
    let mut escaped = false;
    loop {
        let rest = text.get(end..).ok_or(broken)?;
        end += first_special(rest).ok_or(broken)?;
        match text[end] {
            b'"' => {
                *at = end + 1;
                return Ok(((start, end), escaped));
            }
            b'\\' => {
                escaped = true;
                end += 1 + escape_length(&text[end + 1..]).ok_or(broken)?;
            }
            // A raw control character: not JSON.
            _ => return Err(Stop::NotJson { at: end }),
        }
    }
}

/// The length of the escape after a backslash in `rest` (`n`, `u00e9`), when it is one JSON
/// has. serde_json takes any four hex digits after `u`, paired surrogates or not, and so does
/// this.
fn escape_length(rest: &[u8]) -> Option<usize> {
    match rest.first()? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(1),
        b'u' => rest
            .get(1..5)?
            .iter()
            .all(u8::is_ascii_hexdigit)
            .then_some(5),
        _ => None,
    }
}

/// Whether `digits` (a number's text after its minus sign) is as JSON writes numbers:
/// `0` or digits without a leading zero, then `.digits` and `e±digits`, both optional.
fn is_json_number(digits: &[u8]) -> bool {
    let run = |from: usize| {
        digits.get(from..).map_or(0, |rest| {
            rest.iter().take_while(|b| b.is_ascii_digit()).count()
        })
    };
    let mut at = match digits.first() {
        Some(b'0') => 1,
        Some(b'1'..=b'9') => run(0),
        _ => return false,
    };
    if digits.get(at) == Some(&b'.') {
        let fraction = run(at + 1);
        if fraction == 0 {
            return false;
        }
        at += 1 + fraction;
    }
    if let Some(b'e' | b'E') = digits.get(at) {
        at += 1;
        if let Some(b'+' | b'-') = digits.get(at) {
            at += 1;
        }
        let exponent = run(at);
        if exponent == 0 {
            return false;
        }
        at += exponent;
    }
    at == digits.len()
}

/// Whether `byte` can be part of a number's text: what is scanned before the grammar check.
fn continues_a_number(byte: Option<u8>) -> bool {
    matches!(byte, Some(b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9'))
}

/// The powers of ten a double holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// `n` in decimal, written into `buffer`.
fn itoa(mut n: usize, buffer: &mut [u8; 20]) -> &str {
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buffer[at..]).unwrap_or("0")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The one reading of `{"v":<number>}`.
    fn read(number: &str) -> f64 {
        let text = format!(r#"{{"v":{number}}}"#);
        let (readings, ..) = walk(&text, &[], &mut String::new(), &mut Vec::new()).unwrap();
        readings[0].value
    }

    #[test]
    fn numbers_read_exactly_as_serde_json_reads_them() {
        let fixed = [
            "0",
            "0.0",
            "-0.0",
            "0.1",
            "-0.65",
            "101830",
            "1.5e3",
            "-2E-5",
            "0.000123",
            "9007199254740992.0",
            "9007199254740993.0",
            "9007199254740993",
            "123456789012345678.9",
            "1234567890123456789",
            "12345678901234567890",
            "18446744073709551615",
            "18446744073709551616",
            "0.1234567890123456789",
            "3.141592653589793238462643",
            "1.7976931348623157e308",
        ];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(26);
        let random = (0..20_000).map(|_| {
            let digits = rng.random_range(1..=21);
            let mut text = String::new();
            if rng.random_bool(0.5) {
                text.push('-');
            }
            let point = rng.random_range(0..=digits);
            for place in 0..digits {
                if place == point && place > 0 {
                    text.push('.');
                }
                let digit = if place == 0 && digits > 1 && point != 1 {
                    rng.random_range(1..=9)
                } else {
                    rng.random_range(0..=9)
                };
                text.push(char::from(b'0' + digit));
            }
            text
        });
        // "-0" is the one deliberate difference: see `an_integer_zero_has_no_sign`.
        for number in fixed
            .iter()
            .map(|s| (*s).to_owned())
            .chain(random)
            .filter(|number| number != "-0")
        {
            let expected: f64 = serde_json::from_str::<serde_json::Value>(&number)
                .unwrap_or_else(|e| panic!("{number}: {e}"))
                .as_f64()
                .unwrap_or_else(|| panic!("{number}"));
            assert_eq!(
                read(&number).to_bits(),
                expected.to_bits(),
                "{number}: {} against serde_json's {expected}",
                read(&number)
            );
        }
    }

    #[test]
    fn an_integer_zero_has_no_sign() {
        assert!(read("-0").is_sign_positive());
        assert!(read("-0.0").is_sign_negative());
    }

    #[test]
    fn numbers_json_does_not_have_stop_the_walk_where_they_start() {
        for number in [
            "01", "-01", "00.5", "1.", "-1.", ".5", "1.2.3", "--1", "-", "1e", "1.5e", "1e+",
            "1-2", "+1", "1.e5",
        ] {
            let text = format!(r#"{{"v":{number}}}"#);
            match walk(&text, &[], &mut String::new(), &mut Vec::new()) {
                Err(Stop::NotJson { at: 5 }) => {}
                // `+` and `.` cannot start a value at all; the stop is at the same place.
                other => panic!("{number}: {:?}", other.map(|(readings, ..)| readings)),
            }
            assert!(
                serde_json::from_str::<serde_json::Value>(&text).is_err(),
                "{number}"
            );
        }
    }
}
