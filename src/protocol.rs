//! The dweet.io wire protocol facts that both ends share: exact failure strings, the
//! envelope, the `created` timestamp format and the listen stream's inner framing.
//!
//! The public service is gone, so `../shared/dweet-protocol.md` and this module are the
//! reference. The client recognises failures by these strings and the sandbox sends them, so
//! they live here once and neither side can drift from the other.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

/// `because` of a read on an unknown or expired thing (and of a removed alert).
pub const NOT_FOUND: &str = "we couldn't find this";
/// `because` when a locked thing is used without a key.
pub const LOCKED: &str = "this thing is locked and requires a key";
/// `because` when the key does not open the thing (or the lock).
pub const WRONG_KEY: &str = "the key you provided doesn't work with this thing";
/// `because` of `remove_lock` on a lock that is attached to nothing.
pub const LOCK_NOT_IN_USE: &str = "this lock is not in use";
/// Every rate-limit failure contains this phrase; the exact sentence of the public service is
/// unknown, so clients match the phrase, case-insensitively.
pub const RATE_LIMIT_PHRASE: &str = "rate limit";

/// Query parameters that carry protocol options and never become dweet content.
pub const RESERVED_QUERY_KEYS: [&str; 3] = ["key", "callback", "_"];

/// Formats an instant as dweet.io does: UTC, milliseconds, `Z` (`2014-03-19T10:38:46.010Z`).
pub fn format_created(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Parses a `created` string. Accepts any RFC 3339 instant so that clones with other precision
/// still decode; the original string is kept by [`crate::client::Created`] for round trips.
pub fn parse_created(text: &str) -> Option<DateTime<Utc>> {
    if let Some(digits) = canonical_digits(text) {
        return DateTime::from_timestamp_millis(canonical_created_ms(digits)?);
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&Utc))
}

/// [`parse_created`] as milliseconds since the Unix epoch, as records carry it.
pub fn created_ms(text: &str) -> Option<i64> {
    match canonical_digits(text) {
        Some(digits) => canonical_created_ms(digits),
        None => parse_created(text).map(|at| at.timestamp_millis()),
    }
}

/// The instant of a canonical text, from its [`canonical_digits`]; `None` when no such date
/// or time exists. Nearly every dweet's: the fields are read straight off their fixed places
/// and the day counted from the civil calendar (H. Hinnant's `days_from_civil`), where a
/// general RFC 3339 parse took about 400 instructions and chrono's calendar types 280.
fn canonical_created_ms(digits: [u64; 3]) -> Option<i64> {
    // Each byte becomes ten times its digit plus the next byte's: every two-digit field is
    // then one byte where it starts (at most 99, so nothing carries into the next byte).
    let pairs = digits.map(|word| word.wrapping_mul(10).wrapping_add(word >> 8));
    let byte = |word: u64, at: u32| (word >> (8 * at)) & 0xff;
    // `YYYY-MM-` `DDTHH:MM` `:SS.mmmZ`
    let year = byte(pairs[0], 0) * 100 + byte(pairs[0], 2);
    let month = byte(pairs[0], 5);
    let (day, hour, minute) = (byte(pairs[1], 0), byte(pairs[1], 3), byte(pairs[1], 6));
    let second = byte(pairs[2], 1);
    let millisecond = byte(pairs[2], 4) * 10 + byte(digits[2], 6);
    let days_in_month = match month {
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        1..=12 => 31,
        _ => return None,
    };
    if !(1..=days_in_month).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    // Years counted from March, so a leap day ends its year; and from 400 years before
    // year 0, so that year 0's January (then in year -1) is in an era of its own and every
    // division is unsigned.
    let (year, month_from_march) = if month <= 2 {
        (year + 399, month + 9)
    } else {
        (year + 400, month - 3)
    };
    let (era, year_of_era) = (year / 400, year % 400);
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = (era * 146_097 + day_of_era) as i64 - 146_097 - 719_468;
    let seconds_of_day = ((hour * 60 + minute) * 60 + second) as i64;
    Some((days * 86_400 + seconds_of_day) * 1000 + millisecond as i64)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` with digits where digits go and a second below 60: the shape
/// [`format_created`] writes, so a text of it that parses is its own canonical form.
pub fn is_canonical_created(text: &str) -> bool {
    canonical_digits(text).is_some()
}

/// The digits of a text [`is_canonical_created`] accepts, eight bytes to a word as the text
/// has them (little-endian), each byte its digit's value and every other byte zero.
///
/// Eight bytes at a time (every dweet's `created` is read this way): digits where the shape
/// has `0`, its own bytes elsewhere. A byte is a digit when, less `0`, its high nibble is
/// clear and adding six keeps it clear (10 to 15 carry into it). The words are what the parse
/// reads its fields from, where reading them a byte at a time cost 180 instructions a dweet.
fn canonical_digits(text: &str) -> Option<[u64; 3]> {
    const SHAPE: &[u8; 24] = b"0000-00-00T00:00:00.000Z";
    const WORDS: [u64; 3] = words_of(SHAPE);
    const DIGITS: [u64; 3] = places_of(SHAPE, true);
    const OTHERS: [u64; 3] = places_of(SHAPE, false);
    const LOW_NIBBLES: u64 = u64::from_le_bytes([0x0f; 8]);
    const SIX: u64 = u64::from_le_bytes([0x06; 8]);
    const ZEROS: u64 = u64::from_le_bytes([b'0'; 8]);
    let bytes: &[u8; 24] = text.as_bytes().try_into().ok()?;
    if bytes[17] >= b'6' {
        return None;
    }
    let mut digits = [0u64; 3];
    for (at, word) in bytes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(<[u8; 8]>::try_from(word).unwrap_or_default());
        let values = (word ^ ZEROS) & DIGITS[at];
        let canonical = values & !LOW_NIBBLES == 0
            && values.wrapping_add(SIX) & !LOW_NIBBLES & DIGITS[at] == 0
            && (word ^ WORDS[at]) & OTHERS[at] == 0;
        if !canonical {
            return None;
        }
        digits[at] = values;
    }
    Some(digits)
}

/// `shape`'s bytes, eight to a word, as `is_canonical_created` reads the text's.
const fn words_of(shape: &[u8; 24]) -> [u64; 3] {
    let mut words = [0u64; 3];
    let mut at = 0;
    while at < shape.len() {
        words[at / 8] |= (shape[at] as u64) << (at % 8 * 8);
        at += 1;
    }
    words
}

/// Masks of the bytes of `shape` that are `0` (`digits`) or are not, eight to a word.
const fn places_of(shape: &[u8; 24], digits: bool) -> [u64; 3] {
    let mut masks = [0u64; 3];
    let mut at = 0;
    while at < shape.len() {
        if (shape[at] == b'0') == digits {
            masks[at / 8] |= 0xff << (at % 8 * 8);
        }
        at += 1;
    }
    masks
}

/// How a `k=v` value becomes content: a value that reads as a JSON number becomes one (`18.5`,
/// `-3`, `6816513845`); anything else (`007`, `1e999`, `true`, `abc`) stays a string.
pub fn coerce_query_value(value: &str) -> serde_json::Value {
    // A JSON number starts with `-` or a digit and ends with a digit; checking both also keeps
    // serde_json from accepting surrounding whitespace.
    let looks_numeric = value
        .bytes()
        .next()
        .is_some_and(|b| b == b'-' || b.is_ascii_digit())
        && value.bytes().last().is_some_and(|b| b.is_ascii_digit());
    if looks_numeric && let Ok(number) = serde_json::from_str::<serde_json::Number>(value) {
        return serde_json::Value::Number(number);
    }
    serde_json::Value::String(value.to_owned())
}

/// Names a JSON value's kind for error messages: "an array", "a string", ...
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The success envelope. Field order is the wire order: `this` first.
#[derive(Serialize)]
pub struct Success<'a, T: Serialize> {
    pub this: &'static str,
    pub by: &'a str,
    pub the: &'a str,
    pub with: T,
}

impl<'a, T: Serialize> Success<'a, T> {
    pub fn new(by: &'a str, the: &'a str, with: T) -> Self {
        Success {
            this: "succeeded",
            by,
            the,
            with,
        }
    }
}

/// The failure envelope, sent with HTTP 200 by the public service.
#[derive(Serialize)]
pub struct Failure<'a> {
    pub this: &'static str,
    pub with: u16,
    pub because: &'a str,
}

impl<'a> Failure<'a> {
    pub fn new(code: u16, because: &'a str) -> Self {
        Failure {
            this: "failed",
            with: code,
            because,
        }
    }
}

/// The headers a browser may send with a dweet.io call (the public service's list, as the
/// stream was captured with it).
pub const CORS_ALLOW_HEADERS: &str = "X-DWEET-AUTH,X-Requested-With,x-access-token,content-type";
/// The methods the API answers.
pub const CORS_ALLOW_METHODS: &str = "GET,POST,OPTIONS";

/// Frames one compact dweet JSON object for the listen stream: the object is encoded a second
/// time as a JSON string literal, preceded by its length in hex, each line ending in CRLF.
/// Non-ASCII characters are written as `\uXXXX` escapes (surrogate pairs beyond the BMP):
/// dweepy decodes each stream read as ASCII, and a raw UTF-8 byte kills its listener.
pub fn encode_stream_frame(dweet_json: &str) -> Vec<u8> {
    let literal = stream_literal(dweet_json);
    let mut frame = Vec::with_capacity(literal.len() + 12);
    frame.extend_from_slice(format!("{:x}\r\n", literal.len()).as_bytes());
    frame.extend_from_slice(literal.as_bytes());
    frame.extend_from_slice(b"\r\n");
    frame
}

/// `text` as the listen stream's frames write it: a JSON string literal, quotes included, with
/// every non-ASCII character escaped. Each character is written on its own, so the literal of
/// a text is the literals of its pieces, joined without their quotes.
pub fn stream_literal(text: &str) -> String {
    // Encoding a &str as JSON cannot fail.
    ascii_only(&serde_json::to_string(text).unwrap_or_default())
}

/// JSON text with every non-ASCII character as a `\uXXXX` escape; any JSON parser reads it
/// the same.
fn ascii_only(json: &str) -> String {
    if json.is_ascii() {
        return json.to_owned();
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// `local@domain.tld` without spaces: the check a form would make, not RFC 5322.
pub fn is_plausible_email(address: &str) -> bool {
    let Some((local, domain)) = address.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && !address.chars().any(char::is_whitespace)
}

/// Where the first byte a JSON string literal cannot hold as it is (a quote, a backslash or
/// a control character) sits in `bytes`. Eight bytes at a time: in a double-encoded frame an
/// escape comes every few bytes, too often for a vectorised search to pay for its start-up
/// and too rarely for a byte loop to be the cheapest way past the plain runs; the
/// normaliser's names and string values are as short. The stream's unescaper takes the words
/// itself ([`first_special_in_word`]), to copy each one whole as it goes.
pub fn first_special(bytes: &[u8]) -> Option<usize> {
    let mut chunks = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut chunks {
        let mut word = [0; 8];
        word.copy_from_slice(chunk);
        if let Some(at) = first_special_in_word(word) {
            return Some(offset + at);
        }
        offset += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
        .map(|at| offset + at)
}

/// [`first_special`] within eight bytes.
pub fn first_special_in_word(word: [u8; 8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    // The high bit of each byte of `word` below `n` (exact for the lowest such byte, which
    // is all that is read: borrows only ever mark bytes above a true one).
    let below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS;
    let word = u64::from_le_bytes(word);
    let found = below(word ^ (ONES * u64::from(b'"')), 1)
        | below(word ^ (ONES * u64::from(b'\\')), 1)
        | below(word, 0x20);
    (found != 0).then(|| (found.trailing_zeros() / 8) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_shape_parses_exactly_as_rfc_3339_does() {
        let general = |text: &str| {
            DateTime::parse_from_rfc3339(text)
                .ok()
                .map(|at| at.with_timezone(&Utc))
        };
        let texts = [
            "2014-03-19T10:38:46.010Z",
            "0000-01-01T00:00:00.000Z",
            // Year 0's leap day ends the era before it; March starts the first.
            "0000-02-29T23:59:59.999Z",
            "0000-03-01T00:00:00.000Z",
            "9999-12-31T23:59:59.999Z",
            "2024-02-29T12:00:00.500Z",
            "2023-02-29T12:00:00.500Z",
            "2026-13-01T00:00:00.000Z",
            "2026-00-10T00:00:00.000Z",
            "2026-04-31T00:00:00.000Z",
            "2026-01-01T24:00:00.000Z",
            "2026-01-01T23:60:00.000Z",
            "2016-12-31T23:59:60.500Z",
        ];
        for text in texts {
            assert_eq!(parse_created(text), general(text), "{text}");
            assert_eq!(
                created_ms(text),
                general(text).map(|at| at.timestamp_millis()),
                "{text}"
            );
        }
        // Every byte of the shape, each wrong way: a digit's place holds no other byte, and
        // the other places only their own.
        let canonical = *b"2014-03-19T10:38:46.010Z";
        assert!(is_canonical_created("2014-03-19T10:38:46.010Z"));
        for at in 0..canonical.len() {
            for wrong in [
                b'/',
                b':',
                b'a',
                b'T',
                b'Z',
                b'-',
                b'.',
                b' ',
                0x7f,
                b'0' + 10,
                b'0' - 1,
            ] {
                let mut text = canonical;
                if text[at] == wrong || (text[at].is_ascii_digit() && wrong.is_ascii_digit()) {
                    continue;
                }
                text[at] = wrong;
                let text = std::str::from_utf8(&text).unwrap_or_default();
                assert!(!is_canonical_created(text), "{text}");
            }
        }
        assert!(!is_canonical_created("2014-03-19T10:38:46.010é"));
        assert!(
            !is_canonical_created("2014-03-19T10:38:66.010Z"),
            "a second below 60"
        );
        // Instants across four centuries, each through its own canonical text.
        let mut ms = -2_000_000_000_000i64;
        while ms < 10_000_000_000_000 {
            let text = format_created(DateTime::from_timestamp_millis(ms).expect("in range"));
            assert!(is_canonical_created(&text), "{text}");
            assert_eq!(
                parse_created(&text).map(|at| at.timestamp_millis()),
                Some(ms)
            );
            assert_eq!(created_ms(&text), Some(ms), "{text}");
            ms += 987_654_321_987;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4096))]
        /// Every text of the canonical shape, dates and times that do not exist included,
        /// reads as a general RFC 3339 parse reads it; century years and month ends are
        /// drawn often, where the calendar has its exceptions.
        #[test]
        fn canonical_texts_read_as_rfc_3339_reads_them(
            year in proptest::prop_oneof![
                0u32..10_000,
                proptest::strategy::Strategy::prop_map(0u32..100, |century| century * 100),
            ],
            month in 0u32..14,
            day in proptest::prop_oneof![0u32..33, 28u32..32],
            hour in 0u32..25,
            minute in 0u32..61,
            second in 0u32..60,
            milli in 0u32..1000,
        ) {
            let text = format!(
                "{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{milli:03}Z"
            );
            let general = DateTime::parse_from_rfc3339(&text)
                .ok()
                .map(|at| at.with_timezone(&Utc));
            proptest::prop_assert!(is_canonical_created(&text));
            proptest::prop_assert_eq!(parse_created(&text), general, "{}", text);
            let general_ms = general.map(|at| at.timestamp_millis());
            proptest::prop_assert_eq!(created_ms(&text), general_ms, "{}", text);
        }
    }

    #[test]
    fn created_has_milliseconds_and_z() {
        let at = DateTime::parse_from_rfc3339("2014-03-19T10:38:46.01+00:00")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(format_created(at), "2014-03-19T10:38:46.010Z");
        assert_eq!(parse_created("2014-03-19T10:38:46.010Z"), Some(at));
        assert_eq!(parse_created("yesterday"), None);
    }

    #[test]
    fn query_values_that_read_as_numbers_become_numbers() {
        use serde_json::json;
        assert_eq!(coerce_query_value("18.5"), json!(18.5));
        assert_eq!(coerce_query_value("6816513845"), json!(6816513845u64));
        assert_eq!(coerce_query_value("-3"), json!(-3));
        for stays in [
            "007", "1e999", "true", "", " 5", "5 ", "0x10", "NaN", "+1", "world",
        ] {
            assert_eq!(coerce_query_value(stays), json!(stays), "{stays:?}");
        }
    }

    #[test]
    fn stream_frames_are_ascii_and_decode_to_the_same_text() {
        let dweet = r#"{"thing":"café","created":"2014-03-19T10:45:28.934Z","content":{"note":"naïve 😀"}}"#;
        let frame = encode_stream_frame(dweet);
        assert!(frame.is_ascii(), "{}", String::from_utf8_lossy(&frame));
        let text = String::from_utf8(frame).unwrap();
        let literal = text.split("\r\n").nth(1).unwrap();
        let inner: String = serde_json::from_str(literal).unwrap();
        assert_eq!(inner, dweet);
        assert_eq!(
            usize::from_str_radix(text.split("\r\n").next().unwrap(), 16).unwrap(),
            literal.len(),
            "the length counts the escaped bytes"
        );
    }

    #[test]
    fn stream_frame_matches_protocol_example() {
        let dweet = r#"{"thing":"my-thing","created":"2014-03-19T10:45:28.934Z","content":{"some_key":"some_value"}}"#;
        let frame = encode_stream_frame(dweet);
        let expected = "6d\r\n\"{\\\"thing\\\":\\\"my-thing\\\",\\\"created\\\":\\\"2014-03-19T10:45:28.934Z\\\",\\\"content\\\":{\\\"some_key\\\":\\\"some_value\\\"}}\"\r\n";
        assert_eq!(String::from_utf8(frame).unwrap(), expected);
    }

    #[test]
    fn envelopes_are_compact_with_this_first() {
        let ok = serde_json::to_string(&Success::new("dweeting", "dweet", 1)).unwrap();
        assert_eq!(
            ok,
            r#"{"this":"succeeded","by":"dweeting","the":"dweet","with":1}"#
        );
        let failed = serde_json::to_string(&Failure::new(404, NOT_FOUND)).unwrap();
        assert_eq!(
            failed,
            r#"{"this":"failed","with":404,"because":"we couldn't find this"}"#
        );
    }
}
