//! The common dweet line (`{"thing":…,"created":…,"content":{…}}`, no escapes in the two
//! names), from an import's file or a listen stream, read and normalised in one pass over its
//! content.
//!
//! serde_json checks a content by walking it, and the normaliser then walks it again for its
//! numbers: the first walk cost about 4,000 instructions of an import's dweet. Here the
//! normaliser's walk, which holds the text to JSON's grammar, is the only one. A line this
//! reader does not vouch for (an escape in a name, a missing or repeated field, a field it
//! does not know whose value is not a plain string, content the walk stops at) gives `None`,
//! and the caller parses it with serde_json as before. So a line it accepts is one serde_json
//! accepts, with the same fields, and every other line gets serde_json's answer and error.

use std::ops::Range;

use super::{Normalizer, ReadDweet};
use crate::client::{Created, TextDweet};
use crate::protocol::first_special;

/// The dweet on `line` with the readings of its content (named as `normalizer` names them),
/// when the line is JSON of the common shape; `None` means "ask serde_json", never "not a
/// dweet".
pub fn read_dweet_line(line: &[u8], normalizer: &mut Normalizer) -> Option<ReadDweet> {
    read_dweet_text(std::str::from_utf8(line).ok()?, normalizer)
}

/// [`read_dweet_line`] for a line already known to be UTF-8.
pub fn read_dweet_text(text: &str, normalizer: &mut Normalizer) -> Option<ReadDweet> {
    read_dweet_parts(text, normalizer).map(|(read, _)| read)
}

/// Where a common line's parts are in its text.
pub(super) struct LineParts {
    /// The thing's and `created`'s texts, between their quotes.
    pub thing: Range<usize>,
    pub created: Range<usize>,
    /// The content's JSON text.
    pub content: Range<usize>,
}

/// [`read_dweet_text`], with where it found the line's parts.
pub(super) fn read_dweet_parts(
    text: &str,
    normalizer: &mut Normalizer,
) -> Option<(ReadDweet, LineParts)> {
    let mut scan = Envelope {
        bytes: text.as_bytes(),
        at: 0,
    };
    let (mut thing, mut created, mut content) = (None, None, None);
    scan.space();
    scan.byte(b'{')?;
    loop {
        scan.space();
        let key = scan.string()?;
        scan.space();
        scan.byte(b':')?;
        scan.space();
        let repeated = match &text[key] {
            "thing" => thing.replace(scan.string()?).is_some(),
            "created" => created.replace(scan.string()?).is_some(),
            "content" => {
                let start = scan.at;
                let (readings, length) = normalizer.readings_at_start(text.get(start..)?)?;
                scan.at += length;
                content.replace((start..scan.at, readings)).is_some()
            }
            // Ignored, as serde ignores a field it does not know (`transaction`).
            _ => scan.string().map(|_| false)?,
        };
        if repeated {
            return None;
        }
        scan.space();
        match scan.bytes.get(scan.at)? {
            b',' => scan.at += 1,
            b'}' => {
                scan.at += 1;
                break;
            }
            _ => return None,
        }
    }
    scan.space();
    if scan.at != scan.bytes.len() {
        return None;
    }
    let (content, readings) = content?;
    let parts = LineParts {
        thing: thing?,
        created: created?,
        content,
    };
    let dweet = TextDweet::from_checked_parts(
        text[parts.thing.clone()].to_owned(),
        Created::new(&text[parts.created.clone()]),
        text[parts.content.clone()].to_owned(),
    );
    let read = ReadDweet {
        dweet,
        readings: Some(readings),
    };
    Some((read, parts))
}

/// A cursor over the line around the content; each step answers `None` for what it does not
/// vouch for.
struct Envelope<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Envelope<'_> {
    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    fn byte(&mut self, byte: u8) -> Option<()> {
        (*self.bytes.get(self.at)? == byte).then(|| self.at += 1)
    }

    /// A string without escapes or control characters: the range of its text.
    // Inline in the line reader, whatever the codegen units: one change elsewhere once left
    // it a call, 150 instructions a dweet more (`run_pipeline`).
    #[inline]
    fn string(&mut self) -> Option<Range<usize>> {
        self.byte(b'"')?;
        let start = self.at;
        let end = start + first_special(self.bytes.get(start..)?)?;
        (self.bytes[end] == b'"').then(|| {
            self.at = end + 1;
            start..end
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::RawDweet;
    use crate::record::Record;
    use rand::{Rng, SeedableRng};

    const RECEIVED_MS: i64 = 7;

    /// The record serde_json's path makes of `line`, when serde_json reads it as a dweet.
    fn by_serde_json(line: &[u8]) -> Option<Record> {
        let raw = serde_json::from_slice::<RawDweet>(line).ok()?;
        let created_ms = raw.created.to_ms();
        Some(Normalizer::default().normalize(raw, created_ms, RECEIVED_MS))
    }

    fn by_line_reader(line: &[u8]) -> Option<Record> {
        let mut normalizer = Normalizer::default();
        let read = read_dweet_line(line, &mut normalizer)?;
        let created_ms = read.dweet.created().to_ms();
        Some(read.normalize(&mut normalizer, created_ms, RECEIVED_MS))
    }

    #[test]
    fn the_common_shapes_are_read_as_serde_json_reads_them() {
        let lines = [
            r#"{"thing":"S5D9-63de","created":"2026-01-01T00:00:01.000Z","content":{"globals":{"application":"DweetS5D9Client","dweet-count":1},"sensors":{"AccelX":-0.35,"LED":0,"MagZ":-441}}}"#,
            r#"  { "content" : { "a" : [ 1 , 2.5e-3 , -0 , true , false , null , "x\"\u00e9\n" , { } , [ ] ] , "\u00e9t\u00e9" : 1 } , "created" : "2026-01-01T00:00:01Z" , "thing" : "t" }  "#,
            r#"{"thing":"t","created":"2026-01-01T00:00:01.000Z","content":{"big":123456789012345678901234567890,"e":1E+400,"a":1,"a":2},"transaction":"x"}"#,
            r#"{"thing":"t","created":"yesterday","content":{"a":1}}"#,
            r#"{"thing":"t","created":"2026-01-01T00:00:01.000Z","content":[1]}"#,
            r#"{"thing":"","created":"2026-01-01T00:00:01.000Z","content":{}}"#,
            "{\"thing\":\"t\",\"created\":\"2026-01-01T00:00:01.000Z\",\"content\":{\"caf\u{e9}\":2}}\r",
        ];
        for line in lines {
            let read = by_line_reader(line.as_bytes());
            assert!(read.is_some(), "read without serde_json: {line}");
            assert_eq!(read, by_serde_json(line.as_bytes()), "{line}");
        }
    }

    #[test]
    fn what_it_cannot_vouch_for_is_left_to_serde_json() {
        let lines = [
            // serde_json reads these, with unescaping or fields of other kinds.
            r#"{"thing":"t\u0041","created":"c","content":{}}"#,
            r#"{"thing":"t","created":"c","content":{},"with":[1]}"#,
            // serde_json refuses these.
            r#"{"thing":"t","created":"c"}"#,
            r#"{"thing":"t","thing":"u","created":"c","content":{}}"#,
            r#"{"thing":1,"created":"c","content":{}}"#,
            r#"{"thing":"t","created":"c","content":{"a":01}}"#,
            r#"{"thing":"t","created":"c","content":{"a":1.}}"#,
            r#"{"thing":"t","created":"c","content":{"a":.5}}"#,
            r#"{"thing":"t","created":"c","content":{"a":+1}}"#,
            r#"{"thing":"t","created":"c","content":{"a":-}}"#,
            r#"{"thing":"t","created":"c","content":{"a":1e}}"#,
            r#"{"thing":"t","created":"c","content":{"a":1,}}"#,
            r#"{"thing":"t","created":"c","content":{"a":tru}}"#,
            r#"{"thing":"t","created":"c","content":{"a":"\x"}}"#,
            r#"{"thing":"t","created":"c","content":{"a":"\u12"}}"#,
            r#"{"thing":"t","created":"c","content":{}} x"#,
            r#"{"thing":"t","created":"c","content":{}"#,
            "{\"thing\":\"t\",\"created\":\"c\",\"content\":{\"a\":\"\u{1}\"}}",
            "",
        ];
        for line in lines {
            assert_eq!(by_line_reader(line.as_bytes()), None, "{line}");
        }
        let deep = format!(
            r#"{{"thing":"t","created":"c","content":{}1{}}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert_eq!(by_line_reader(deep.as_bytes()), None);
        assert!(
            matches!(by_serde_json(deep.as_bytes()), Some(Record::DeadLetter(_))),
            "serde_json reads it, and the normaliser refuses it with its reason"
        );
        let not_utf_8 = b"{\"thing\":\"\xff\",\"created\":\"c\",\"content\":{}}";
        assert_eq!(by_line_reader(not_utf_8), None);
    }

    /// Damaged lines, at random: whatever the line reader accepts, serde_json accepts, and
    /// the records are the same.
    #[test]
    fn no_damaged_line_is_accepted_that_serde_json_refuses() {
        let base = br#"{"thing":"b-1","created":"2026-01-01T00:00:01.000Z","content":{"s":{"x":-1.25e3,"y":[0,true,null],"z\u00e9":"a\"b"},"n":"v"},"transaction":"t"}"#;
        let alphabet = b"{}[]\":,.-+eE0123456789 tfnrul\\x\x01";
        let mut rng = rand::rngs::StdRng::seed_from_u64(26);
        let mut accepted = 0;
        for _ in 0..20_000 {
            let mut line = base.to_vec();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=line.len());
                let byte = alphabet[rng.random_range(0..alphabet.len())];
                match rng.random_range(0..3) {
                    0 if at < line.len() => line[at] = byte,
                    1 if at < line.len() => {
                        line.remove(at);
                    }
                    _ => line.insert(at, byte),
                }
            }
            if let Some(read) = by_line_reader(&line) {
                accepted += 1;
                assert_eq!(
                    Some(read),
                    by_serde_json(&line),
                    "{}",
                    String::from_utf8_lossy(&line)
                );
            }
        }
        assert!(
            accepted > 1_000,
            "the damage left some lines valid: {accepted}"
        );
    }
}
