//! The listen stream's frame decoder: bytes in, dweets out, no I/O.
//!
//! dweet.io frames each dweet as `<hex length>\r\n<JSON string literal>\r\n` inside one HTTP
//! chunk, but nothing guarantees that a read returns exactly one chunk, and clones stream plain
//! NDJSON instead. So the decoder is line-oriented, the way robust clients in the wild are:
//! it buffers until a newline, ignores the hex length lines, decodes a string literal twice,
//! accepts an object line as is, and skips (and reports) anything else. A line longer than
//! `max_line` is dropped up to its newline so a hostile server cannot grow memory without bound.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::types::Dweet;
use crate::protocol::{first_special, first_special_in_word};

/// The default longest line kept: far above the protocol's 2000-character content limit, even
/// double-encoded, and small enough to bound the memory of ten thousand streams.
pub const DEFAULT_MAX_LINE: usize = 64 * 1024;

/// What one complete line turned out to be: by default a [`Dweet`]; the ingest path asks for
/// a [`super::RawDweet`] instead.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<D = Dweet> {
    Dweet(D),
    /// The server answered with a failure envelope instead of a stream (a locked thing, say).
    Failure {
        code: Option<u16>,
        because: String,
    },
    /// A line that is neither a frame nor a length line; skipped and counted.
    Skipped(SkippedLine),
}

/// A line the decoder could not use, with the start of its text (lossy UTF-8, at most
/// [`EXCERPT_BYTES`]) so that callers can keep it as a dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    pub reason: SkipReason,
    pub excerpt: String,
}

/// How much of a skipped line is kept.
pub const EXCERPT_BYTES: usize = 4096;

fn skipped<D>(reason: SkipReason, line: &[u8]) -> Decoded<D> {
    let end = line.len().min(EXCERPT_BYTES);
    Decoded::Skipped(SkippedLine {
        reason,
        excerpt: String::from_utf8_lossy(&line[..end]).into_owned(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// Not JSON at all (or invalid UTF-8 inside it).
    NotJson,
    /// JSON, but not a dweet; carries the decoder's complaint.
    NotADweet(String),
    /// Longer than the decoder's line limit; dropped up to its newline.
    TooLong,
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::NotJson => f.write_str("line is not JSON"),
            SkipReason::NotADweet(why) => write!(f, "JSON line is not a dweet: {why}"),
            SkipReason::TooLong => f.write_str("line exceeds the length limit"),
        }
    }
}

/// What a listen stream offers each line's JSON object before serde_json reads it as a `D`.
/// What a reader accepts must be what serde_json would read as a `D` from the same object,
/// and give the same; `None` means "ask serde_json". A closure over the object's text is one.
pub trait ObjectReader<D> {
    /// A double-encoded frame's literal as it came, still escaped (the bytes between its
    /// quotes). A reader that can read it without unescaping it answers here; `None` has the
    /// decoder unescape it and offer the text to [`ObjectReader::read`].
    fn read_literal(&mut self, _literal: &[u8]) -> Option<D> {
        None
    }

    /// A JSON object's text.
    fn read(&mut self, json: &str) -> Option<D>;
}

impl<D, F: FnMut(&str) -> Option<D>> ObjectReader<D> for F {
    fn read(&mut self, json: &str) -> Option<D> {
        self(json)
    }
}

#[derive(Debug)]
pub struct FrameDecoder {
    /// What is carried over from earlier reads: a line a read ended inside, and what came
    /// after it when bytes were pushed before the last were read.
    buf: Vec<u8>,
    /// Bytes of `buf` before this offset were already consumed.
    consumed: usize,
    /// The last read, its whole lines read where they lie rather than copied (a copy of every
    /// read was 2% of the worker's CPU); empty once read to its end.
    read: Bytes,
    /// Bytes of `read` before this offset were already consumed.
    read_at: usize,
    /// Dropping the rest of an over-long line until its newline.
    discarding: bool,
    max_line: usize,
    /// The inner JSON of the last double-encoded line, reused so a frame costs no allocation.
    literal: Vec<u8>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::with_max_line(DEFAULT_MAX_LINE)
    }

    pub fn with_max_line(max_line: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            consumed: 0,
            read: Bytes::new(),
            read_at: 0,
            discarding: false,
            max_line,
            literal: Vec::new(),
        }
    }

    /// Feeds bytes as they arrived from the network, in any split (copied; see
    /// [`FrameDecoder::push_read`]).
    pub fn push(&mut self, bytes: &[u8]) {
        self.push_read(Bytes::copy_from_slice(bytes));
    }

    /// Feeds a read as the network handed it, in any split: its whole lines are read where
    /// they lie, and only a line it ends inside is copied.
    pub fn push_read(&mut self, mut read: Bytes) {
        if self.discarding {
            match memchr::memchr(b'\n', &read) {
                Some(end) => {
                    self.discarding = false;
                    read = read.slice(end + 1..);
                }
                None => return,
            }
        }
        self.carry_read();
        self.read = read;
        self.read_at = 0;
    }

    /// Moves what is left of the last read behind what is carried, and lets the read go: a
    /// read may share its allocation with the connection's buffer, which a stream must not
    /// hold while it waits.
    fn carry_read(&mut self) {
        let rest = self.read.get(self.read_at..).unwrap_or_default();
        if !rest.is_empty() {
            if self.consumed > 0 && self.consumed >= self.buf.len() / 2 {
                self.buf.drain(..self.consumed);
                self.consumed = 0;
            }
            self.buf.extend_from_slice(rest);
        }
        self.read = Bytes::new();
        self.read_at = 0;
    }

    /// The next complete line's meaning, or `None` until more bytes arrive.
    pub fn next_event(&mut self) -> Option<Decoded> {
        self.next_event_as()
    }

    /// [`FrameDecoder::next_event`], decoding each dweet as `D`.
    pub fn next_event_as<D: DeserializeOwned>(&mut self) -> Option<Decoded<D>> {
        self.next_event_read_by(&mut |_: &str| None)
    }

    /// [`FrameDecoder::next_event_as`], offering each JSON object to `reader` first (a frame's
    /// literal still escaped, then its text): what it makes a `D` of is the dweet, and
    /// serde_json reads what it declines (`None`). A reader must accept only what serde_json
    /// would read as a `D`, and give the same.
    pub fn next_event_read_by<D: DeserializeOwned>(
        &mut self,
        reader: &mut dyn ObjectReader<D>,
    ) -> Option<Decoded<D>> {
        loop {
            let event = if self.consumed == self.buf.len() {
                // Nothing carried: the read's next line where it lies.
                self.buf.clear();
                self.consumed = 0;
                let Some(line) = next_line(&self.read, &mut self.read_at) else {
                    self.carry_read();
                    break;
                };
                line_event(&self.read[line], self.max_line, &mut self.literal, reader)
            } else if let Some(line) = next_line(&self.buf, &mut self.consumed) {
                line_event(&self.buf[line], self.max_line, &mut self.literal, reader)
            } else {
                // The carried line ends in the read, or goes on past it.
                let rest = self.read.get(self.read_at..).unwrap_or_default();
                let Some(end) = memchr::memchr(b'\n', rest) else {
                    self.carry_read();
                    break;
                };
                self.buf.extend_from_slice(&rest[..=end]);
                self.read_at += end + 1;
                continue;
            };
            if event.is_some() {
                return event;
            }
        }
        // No whole line is left: what is carried is the start of one.
        let pending = &self.buf[self.consumed..];
        if pending.len() > self.max_line {
            let event = skipped(SkipReason::TooLong, pending);
            self.clear();
            self.discarding = true;
            return Some(event);
        }
        None
    }

    /// Decodes a last line that ended without a newline, when the connection closes.
    pub fn finish(&mut self) -> Option<Decoded> {
        self.finish_as()
    }

    /// [`FrameDecoder::finish`], decoding a dweet as `D`.
    pub fn finish_as<D: DeserializeOwned>(&mut self) -> Option<Decoded<D>> {
        self.finish_read_by(&mut |_: &str| None)
    }

    /// [`FrameDecoder::finish_as`] with a `reader` as [`FrameDecoder::next_event_read_by`]
    /// has it.
    pub fn finish_read_by<D: DeserializeOwned>(
        &mut self,
        reader: &mut dyn ObjectReader<D>,
    ) -> Option<Decoded<D>> {
        self.carry_read();
        let last = classify_line(&self.buf[self.consumed..], &mut self.literal, reader);
        self.clear();
        self.discarding = false;
        last
    }

    /// Forgets any partial line, for a fresh connection.
    pub fn reset(&mut self) {
        self.clear();
        self.discarding = false;
    }

    fn clear(&mut self) {
        self.buf.clear();
        self.consumed = 0;
        self.read = Bytes::new();
        self.read_at = 0;
    }
}

/// Where the next line of `bytes` from `*at` lies, without its newline, stepping past it;
/// `None` while the line goes on past `bytes`.
fn next_line(bytes: &[u8], at: &mut usize) -> Option<Range<usize>> {
    let end = *at + memchr::memchr(b'\n', bytes.get(*at..)?)?;
    let line = *at..end;
    *at = end + 1;
    Some(line)
}

/// What a whole line means: skipped when longer than `max_line`, else [`classify_line`]'s.
fn line_event<D: DeserializeOwned>(
    line: &[u8],
    max_line: usize,
    literal: &mut Vec<u8>,
    reader: &mut dyn ObjectReader<D>,
) -> Option<Decoded<D>> {
    if line.len() > max_line {
        return Some(skipped(SkipReason::TooLong, line));
    }
    classify_line(line, literal, reader)
}

#[derive(Deserialize)]
struct FailureLine {
    this: String,
    with: Option<u16>,
    because: String,
}

/// Decodes one line without its newline; `None` for lines that carry no dweet by design
/// (blank lines, hex chunk lengths). `literal` is scratch space for a string literal's text;
/// `reader` is offered each object first.
fn classify_line<D: DeserializeOwned>(
    line: &[u8],
    literal: &mut Vec<u8>,
    reader: &mut dyn ObjectReader<D>,
) -> Option<Decoded<D>> {
    let line = line.trim_ascii();
    if line.is_empty() || is_hex_length(line) {
        return None;
    }
    if let Some(body) = line
        .strip_prefix(b"\"")
        .and_then(|rest| rest.strip_suffix(b"\""))
        && let Some(dweet) = reader.read_literal(body)
    {
        return Some(Decoded::Dweet(dweet));
    }
    let reason = match line[0] {
        b'"' => match unescape_literal(line, literal) {
            Some(inner) => match decode_object(inner, reader) {
                Ok(event) => return Some(event),
                Err(reason) => reason,
            },
            None => SkipReason::NotJson,
        },
        b'{' => match std::str::from_utf8(line).map(|json| decode_object(json, reader)) {
            Ok(Ok(event)) => return Some(event),
            Ok(Err(reason)) => reason,
            Err(_) => SkipReason::NotJson,
        },
        _ => SkipReason::NotJson,
    };
    Some(skipped(reason, line))
}

/// Decodes a JSON object, `reader` first; from `&str`, so serde_json does not check the UTF-8
/// again in every string it reads.
fn decode_object<D: DeserializeOwned>(
    json: &str,
    reader: &mut dyn ObjectReader<D>,
) -> Result<Decoded<D>, SkipReason> {
    if let Some(dweet) = reader.read(json) {
        return Ok(Decoded::Dweet(dweet));
    }
    match serde_json::from_str::<D>(json) {
        Ok(dweet) => Ok(Decoded::Dweet(dweet)),
        Err(dweet_error) => match serde_json::from_str::<FailureLine>(json) {
            Ok(failure) if failure.this == "failed" => Ok(Decoded::Failure {
                code: failure.with,
                because: failure.because,
            }),
            _ if dweet_error.is_syntax() || dweet_error.is_eof() => Err(SkipReason::NotJson),
            _ => Err(SkipReason::NotADweet(dweet_error.to_string())),
        },
    }
}

/// The text of the JSON string literal that is the whole of `line`, unescaped into `out`;
/// `None` when `line` is not exactly one valid literal. This is the stream's hot path: an
/// escape comes every few bytes of a frame, so each eight bytes are copied whole and cut back
/// to the first escape among them (a copy of a known size, where a run of its own length
/// cost a call), and nothing is allocated once `out` has grown to a frame's size.
fn unescape_literal<'o>(line: &[u8], out: &'o mut Vec<u8>) -> Option<&'o str> {
    let body = line.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    out.clear();
    out.reserve(body.len());
    let mut rest = body;
    loop {
        let at = match rest.split_first_chunk::<8>() {
            Some((word, after)) => {
                out.extend_from_slice(word);
                match first_special_in_word(*word) {
                    Some(at) => {
                        out.truncate(out.len() - (8 - at));
                        at
                    }
                    None => {
                        rest = after;
                        continue;
                    }
                }
            }
            None => match first_special(rest) {
                Some(at) => {
                    out.extend_from_slice(&rest[..at]);
                    at
                }
                None => {
                    out.extend_from_slice(rest);
                    break;
                }
            },
        };
        rest = &rest[at..];
        if rest[0] != b'\\' {
            return None; // an unescaped quote ends the literal early; a raw control is invalid
        }
        let escape = *rest.get(1)?;
        rest = &rest[2..];
        match escape {
            b'"' | b'\\' | b'/' => out.push(escape),
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'u' => {
                let (unit, after) = hex_unit(rest)?;
                rest = after;
                let code = if (0xD800..0xDC00).contains(&unit) {
                    let after = rest.strip_prefix(b"\\u")?;
                    let (low, after) = hex_unit(after)?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    rest = after;
                    0x10000 + ((u32::from(unit) - 0xD800) << 10) + (u32::from(low) - 0xDC00)
                } else {
                    u32::from(unit)
                };
                let ch = char::from_u32(code)?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
            }
            _ => return None,
        }
    }
    std::str::from_utf8(out).ok()
}

/// The four hex digits of a `\u` escape, and what follows them.
fn hex_unit(text: &[u8]) -> Option<(u16, &[u8])> {
    let digits = text.get(..4)?;
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let unit = u16::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()?;
    Some((unit, &text[4..]))
}

fn is_hex_length(line: &[u8]) -> bool {
    line.len() <= 16 && line.iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Created;
    use crate::protocol::encode_stream_frame;

    const DWEET: &str = r#"{"thing":"my-thing","created":"2014-03-19T10:45:28.934Z","content":{"some_key":"some_value","n":6816513845}}"#;

    fn drain(decoder: &mut FrameDecoder) -> Vec<Decoded> {
        std::iter::from_fn(|| decoder.next_event()).collect()
    }

    fn dweets(events: &[Decoded]) -> usize {
        events
            .iter()
            .filter(|e| matches!(e, Decoded::Dweet(_)))
            .count()
    }

    #[test]
    fn a_reader_is_offered_each_object_first_and_serde_json_reads_what_it_declines() {
        let mut decoder = FrameDecoder::new();
        let other = DWEET.replace("my-thing", "other-thing");
        let failure = r#"{"this":"failed","with":403,"because":"locked"}"#;
        let mut input = encode_stream_frame(DWEET);
        input.extend_from_slice(format!("{other}\n{failure}\n[1]\n").as_bytes());
        decoder.push(&input);
        let mut offered = Vec::new();
        let mut reader = |json: &str| {
            offered.push(json.to_owned());
            json.contains("my-thing").then(|| Dweet {
                thing: "read by the reader".to_owned(),
                created: Created::new("c"),
                content: serde_json::Value::Null,
                transaction: None,
            })
        };
        let events: Vec<Decoded> =
            std::iter::from_fn(|| decoder.next_event_read_by(&mut reader)).collect();
        assert_eq!(offered, vec![DWEET.to_owned(), other, failure.to_owned()]);
        let things: Vec<&str> = events
            .iter()
            .filter_map(|event| match event {
                Decoded::Dweet(dweet) => Some(dweet.thing.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(things, vec!["read by the reader", "other-thing"]);
        assert!(matches!(
            events[2],
            Decoded::Failure {
                code: Some(403),
                ..
            }
        ));
        assert!(matches!(events[3], Decoded::Skipped(_)), "{events:?}");
    }

    proptest::proptest! {
        #[test]
        fn the_word_search_finds_the_first_special_byte(bytes in proptest::collection::vec(proptest::prop_oneof![
            proptest::prelude::Just(b'"'), proptest::prelude::Just(b'\\'), proptest::prelude::Just(0x1f_u8),
            proptest::prelude::Just(0x20_u8), proptest::prelude::Just(0x21_u8), proptest::prelude::Just(0x5b_u8),
            proptest::prelude::Just(0x5d_u8), proptest::prelude::Just(0xa2_u8), proptest::prelude::Just(0xdc_u8),
            proptest::prelude::Just(0x00_u8), proptest::prelude::Just(0x80_u8), 0x20u8..0x7f], 0..40)) {
            let expected = bytes.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
            proptest::prop_assert_eq!(first_special(&bytes), expected);
        }

        #[test]
        fn the_literal_unescaper_agrees_with_serde_json(text in ".{0,80}") {
            let literal = serde_json::to_string(&text).unwrap();
            let mut out = Vec::new();
            proptest::prop_assert_eq!(unescape_literal(literal.as_bytes(), &mut out), Some(text.as_str()));
        }

        #[test]
        fn the_literal_unescaper_agrees_with_serde_json_on_escape_dense_text(text in r#"["\\\x00-\x1fa-z :{}é😀]{0,80}"#) {
            let literal = serde_json::to_string(&text).unwrap();
            let mut out = Vec::new();
            proptest::prop_assert_eq!(unescape_literal(literal.as_bytes(), &mut out), Some(text.as_str()));
        }

        #[test]
        fn the_literal_unescaper_refuses_what_serde_json_refuses(body in proptest::collection::vec(proptest::prop_oneof![
            proptest::prelude::Just(b'\\'), proptest::prelude::Just(b'"'), proptest::prelude::Just(b'u'),
            proptest::prelude::Just(b'D'), proptest::prelude::Just(b'8'), proptest::prelude::Just(b'c'),
            proptest::prelude::Just(b'+'), proptest::prelude::any::<u8>()], 0..48)) {
            let mut line = vec![b'"'];
            line.extend(&body);
            line.push(b'"');
            let mut out = Vec::new();
            let ours = unescape_literal(&line, &mut out).map(|text| text.as_bytes().to_vec());
            let theirs = serde_json::from_slice::<String>(&line).ok().map(String::into_bytes);
            proptest::prop_assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn decodes_one_protocol_frame() {
        let mut decoder = FrameDecoder::new();
        decoder.push(&encode_stream_frame(DWEET));
        let events = drain(&mut decoder);
        assert_eq!(events.len(), 1);
        let Decoded::Dweet(dweet) = &events[0] else {
            panic!("expected a dweet, got {events:?}");
        };
        assert_eq!(dweet.thing, "my-thing");
        assert_eq!(dweet.created.as_str(), "2014-03-19T10:45:28.934Z");
        assert_eq!(dweet.content["n"], serde_json::json!(6816513845u64));
        assert_eq!(dweet.transaction, None);
    }

    #[test]
    fn decodes_several_frames_in_one_read() {
        let mut bytes = Vec::new();
        for _ in 0..5 {
            bytes.extend(encode_stream_frame(DWEET));
        }
        let mut decoder = FrameDecoder::new();
        decoder.push(&bytes);
        assert_eq!(dweets(&drain(&mut decoder)), 5);
    }

    #[test]
    fn decodes_frames_split_at_every_position() {
        let mut bytes = encode_stream_frame(DWEET);
        bytes.extend(encode_stream_frame(DWEET));
        for split in 0..=bytes.len() {
            let mut decoder = FrameDecoder::new();
            decoder.push(&bytes[..split]);
            let mut events = drain(&mut decoder);
            decoder.push(&bytes[split..]);
            events.extend(drain(&mut decoder));
            assert_eq!(dweets(&events), 2, "split at {split}");
            assert_eq!(events.len(), 2, "split at {split}: {events:?}");
        }
    }

    /// Reads cut anywhere, lines read in place or carried across reads, give the events one
    /// read of the whole gives; a waiting decoder holds none of the reads.
    #[test]
    fn decodes_reads_cut_at_every_two_positions() {
        let mut whole = encode_stream_frame(DWEET);
        whole.extend(format!("{DWEET}\nnot json\n").as_bytes());
        whole.extend(encode_stream_frame(DWEET));
        let whole = Bytes::from(whole);
        let mut decoder = FrameDecoder::new();
        decoder.push_read(whole.clone());
        let expected = drain(&mut decoder);
        assert_eq!(dweets(&expected), 3, "{expected:?}");
        assert_eq!(expected.len(), 4, "{expected:?}");
        for first in 0..=whole.len() {
            for second in first..=whole.len() {
                let mut decoder = FrameDecoder::new();
                let mut events = Vec::new();
                for (index, read) in [0..first, first..second, second..whole.len()]
                    .into_iter()
                    .enumerate()
                {
                    decoder.push_read(whole.slice(read));
                    // The second read is pushed before the first is read: it queues behind.
                    if index != 0 {
                        events.extend(drain(&mut decoder));
                        assert!(decoder.read.is_empty(), "a waiting decoder holds no read");
                    }
                }
                assert_eq!(events, expected, "reads cut at {first} and {second}");
            }
        }
    }

    #[test]
    fn decodes_one_byte_at_a_time() {
        let bytes = encode_stream_frame(DWEET);
        let mut decoder = FrameDecoder::new();
        let mut events = Vec::new();
        for byte in &bytes {
            decoder.push(std::slice::from_ref(byte));
            events.extend(drain(&mut decoder));
        }
        assert_eq!(dweets(&events), 1);
    }

    #[test]
    fn accepts_ndjson_object_lines() {
        let mut decoder = FrameDecoder::new();
        decoder.push(format!("{DWEET}\n{DWEET}\r\n").as_bytes());
        assert_eq!(dweets(&drain(&mut decoder)), 2);
    }

    #[test]
    fn skips_and_reports_garbage_lines() {
        let mut decoder = FrameDecoder::new();
        decoder.push(b"hello there\n{\"not\":\"a dweet\"}\n\"unterminated\n\xff\xfe\n[1,2]\n");
        decoder.push(&encode_stream_frame(DWEET));
        let events = drain(&mut decoder);
        assert_eq!(dweets(&events), 1);
        let skipped: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Decoded::Skipped(line) => Some(line.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(skipped.len(), 5, "{skipped:?}");
        assert!(matches!(skipped[1].reason, SkipReason::NotADweet(_)));
        assert_eq!(
            skipped[0].excerpt, "hello there",
            "the line is kept for dead letters"
        );
    }

    #[test]
    fn reports_a_failure_envelope() {
        let mut decoder = FrameDecoder::new();
        decoder.push(
            br#"{"this":"failed","with":403,"because":"this thing is locked and requires a key"}"#,
        );
        assert_eq!(decoder.next_event(), None);
        assert_eq!(
            decoder.finish(),
            Some(Decoded::Failure {
                code: Some(403),
                because: crate::protocol::LOCKED.to_owned()
            })
        );
    }

    #[test]
    fn drops_overlong_lines_and_recovers() {
        let mut decoder = FrameDecoder::with_max_line(256);
        for _ in 0..100 {
            decoder.push(&[b'x'; 100]);
            let _ = drain(&mut decoder);
        }
        assert!(decoder.buf.capacity() < 4096, "buffer grew without bound");
        decoder.push(b"xxx\n");
        decoder.push(&encode_stream_frame(
            r#"{"thing":"t","created":"2014-03-19T10:45:28.934Z","content":{}}"#,
        ));
        let events = drain(&mut decoder);
        assert_eq!(dweets(&events), 1, "{events:?}");
    }

    #[test]
    fn a_complete_overlong_line_is_skipped() {
        let mut decoder = FrameDecoder::with_max_line(16);
        decoder.push(b"\"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\"\n");
        let events = drain(&mut decoder);
        assert!(
            matches!(
                &events[..],
                [Decoded::Skipped(SkippedLine {
                    reason: SkipReason::TooLong,
                    ..
                })]
            ),
            "{events:?}"
        );
    }
}
