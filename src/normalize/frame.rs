//! A listen stream's frames read without unescaping them, by the shape of the thing's last
//! frame.
//!
//! A frame is the dweet's line written a second time as a JSON string literal, so every quote
//! in it comes escaped, and unescaping a frame cost more than reading its content. A thing's
//! frames differ only in their values (when it was created, the numbers, now and then a
//! string). So once a frame's line has been read, the next frame is compared, still escaped,
//! with the last one's literal between the values, and the values are read where they sit:
//! numbers and booleans are written alike escaped or not, and a string with nothing to escape
//! is the same string in the frame as in the line. The frame then stands for the last line
//! with these values in their places, which the line reader reads the same way (the text
//! around the values is a line it accepted, and each value is read by the walk's parsers).
//!
//! Anything else (other text, a value of another kind, a string with escapes, a number that
//! does not parse or is not finite) goes to the decoder to unescape and to the line reader,
//! and that line becomes the shape for the next frame. The last line's literal is written here
//! as the sandbox writes frames ([`crate::protocol::stream_literal`]); a server that escapes
//! otherwise gets the line reader every time, after a few failed tries.

use std::ops::Range;
use std::sync::Arc;

use super::leaves::{self, Held};
use super::line::{LineParts, read_dweet_parts};
use super::shape::{Tries, matching, reading_at};
use super::{Normalizer, ReadDweet};
use crate::client::{Created, ObjectReader, TextDweet};
use crate::protocol::{first_special, stream_literal};
use crate::record::Reading;

/// Reads one listen stream's frames: by the last frame's shape where it fits, by the line
/// reader ([`super::read_dweet_text`]) where it does not. serde_json reads what neither does.
#[derive(Debug, Default)]
pub struct StreamReader {
    names: Normalizer,
    frame: FrameShape,
    tries: Tries,
    /// Whether the last frame was tried against the shape: its line then becomes the shape.
    tried: bool,
}

impl ObjectReader<ReadDweet> for StreamReader {
    fn read_literal(&mut self, literal: &[u8]) -> Option<ReadDweet> {
        self.tried = self.tries.due();
        if self.tried
            && let Some(read) = self.frame.read(literal)
        {
            self.tries.fitted();
            self.tried = false;
            return Some(read);
        }
        self.tries.missed();
        None
    }

    fn read(&mut self, json: &str) -> Option<ReadDweet> {
        let (read, parts) = read_dweet_parts(json, &mut self.names)?;
        if std::mem::take(&mut self.tried) {
            let readings = read.readings.as_deref().unwrap_or_default();
            self.frame.keep(json, &parts, readings);
            // While frames are read by their shape the content's is not used.
            if !self.frame.line.is_empty() {
                self.names.drop_shape();
            }
        }
        Some(read)
    }
}

/// The last frame's line, its literal, and where its values sit in both.
#[derive(Debug, Default)]
struct FrameShape {
    /// The line; empty when there is no shape to match.
    line: String,
    /// The line as a frame writes it, between the literal's quotes.
    literal: Vec<u8>,
    slots: Vec<FrameSlot>,
    /// The names of the readings, one for each slot that holds one.
    names: Vec<Arc<str>>,
    /// Where the content is in `line`.
    content: Range<usize>,
    /// The content's text after the last slot, in `line`.
    content_after: Range<usize>,
    /// Which slots hold the thing and `created`.
    thing: usize,
    created: usize,
    /// The thing's name in `line`: a stream carries one thing's dweets, so a frame's name is
    /// this text, already known to be text, almost always.
    thing_name: Range<usize>,
}

/// A value's place in the literal (a string's quotes included), and what the line has of the
/// content before it.
#[derive(Debug, Clone)]
struct FrameSlot {
    kind: Held,
    literal: Range<usize>,
    /// The content's text between the last slot and this one, in the line (empty where the
    /// slot is outside the content): worked out once, not for every frame.
    content_before: Range<usize>,
}

impl FrameShape {
    /// Keeps `line`, which the line reader read into `parts` and `readings`, as the shape;
    /// forgets the shape when the line has none a frame can be read by.
    fn keep(&mut self, line: &str, parts: &LineParts, readings: &[Reading]) {
        self.line.clear();
        // The content's values, found again (a content read by its own shape has no places
        // of its own); its readings' names are reused, so this allocates no name.
        let names: Vec<Arc<str>> = readings.iter().map(|r| Arc::clone(&r.sensor)).collect();
        let mut content_slots = Vec::new();
        let Ok((found, ..)) = leaves::walk(
            &line[parts.content.clone()],
            &names,
            &mut String::new(),
            &mut content_slots,
        ) else {
            return;
        };
        // Readings merged under a repeated name are not one per slot: no shape holds them.
        if found.len() != readings.len() {
            return;
        }
        let quoted = |text: &Range<usize>| text.start - 1..text.end + 1;
        let mut places: Vec<(Held, Range<usize>)> = Vec::with_capacity(content_slots.len() + 2);
        places.push((Held::Text, quoted(&parts.thing)));
        places.push((Held::Text, quoted(&parts.created)));
        let offset = parts.content.start;
        places.extend(
            content_slots
                .iter()
                .map(|slot| (slot.kind, offset + slot.start..offset + slot.end)),
        );
        places.sort_by_key(|(_, place)| place.start);
        self.literal.clear();
        self.slots.clear();
        let (thing, created) = (quoted(&parts.thing), quoted(&parts.created));
        let (mut thing_slot, mut created_slot) = (None, None);
        let mut from = 0;
        for (kind, place) in places {
            push_escaped(&mut self.literal, &line[from..place.start]);
            let start = self.literal.len();
            let value = &line[place.clone()];
            if kind == Held::Text {
                let text = &value[1..value.len() - 1];
                if !is_plain(text.as_bytes()) {
                    return;
                }
                self.literal.extend_from_slice(b"\\\"");
                self.literal.extend_from_slice(text.as_bytes());
                self.literal.extend_from_slice(b"\\\"");
            } else {
                self.literal.extend_from_slice(value.as_bytes());
            }
            let literal = start..self.literal.len();
            if place == thing {
                thing_slot = Some(self.slots.len());
            } else if place == created {
                created_slot = Some(self.slots.len());
            }
            self.slots.push(FrameSlot {
                kind,
                literal,
                content_before: within(&parts.content, from..place.start),
            });
            from = place.end;
        }
        push_escaped(&mut self.literal, &line[from..]);
        let (Some(thing), Some(created)) = (thing_slot, created_slot) else {
            return;
        };
        self.thing = thing;
        self.created = created;
        self.thing_name = parts.thing.clone();
        self.content = parts.content.clone();
        self.content_after = within(&parts.content, from..line.len());
        self.names = names;
        self.line.push_str(line);
    }

    /// The dweet the frame whose literal is `literal` carries, when it is of this shape.
    fn read(&self, literal: &[u8]) -> Option<ReadDweet> {
        if self.line.is_empty() {
            return None;
        }
        // Bytes, checked as UTF-8 once at the end: the line's pieces are text, the values
        // ASCII or checked.
        let mut content = Vec::with_capacity(self.content.len() + 16);
        let mut readings = Vec::with_capacity(self.names.len());
        let mut names = self.names.iter();
        let (mut thing, mut created) = ("", "");
        let line = self.line.as_bytes();
        // Where the text after the last slot starts: in the shape's literal and in the frame's.
        let (mut from, mut at) = (0, 0);
        for (index, slot) in self.slots.iter().enumerate() {
            at = matching(literal, at, &self.literal[from..slot.literal.start])?;
            content.extend_from_slice(line.get(slot.content_before.clone())?);
            let start = at;
            let value = match slot.kind {
                Held::Text => {
                    let text = plain_string(literal, &mut at)?;
                    if index == self.thing {
                        thing = self.name_of_thing(text)?;
                    } else if index == self.created {
                        created = std::str::from_utf8(text).ok()?;
                    } else {
                        // Every slot but the thing's and `created`'s is the content's, whose
                        // text is checked whole.
                        content.push(b'"');
                        content.extend_from_slice(text);
                        content.push(b'"');
                    }
                    None
                }
                kind => Some(reading_at(kind, literal, &mut at)?),
            };
            if let Some(value) = value {
                // What was read is what the line holds.
                content.extend_from_slice(&literal[start..at]);
                let sensor = Arc::clone(names.next()?);
                readings.push(Reading { sensor, value });
            }
            from = slot.literal.end;
        }
        if matching(literal, at, &self.literal[from..])? != literal.len() {
            return None;
        }
        content.extend_from_slice(line.get(self.content_after.clone())?);
        let content = String::from_utf8(content).ok()?;
        let dweet = TextDweet::from_checked_parts(thing.to_owned(), Created::new(created), content);
        Some(ReadDweet {
            dweet,
            readings: Some(readings),
        })
    }

    /// A frame's thing name as text: the shape's own where it is the same.
    fn name_of_thing<'a>(&'a self, name: &'a [u8]) -> Option<&'a str> {
        match self.line.get(self.thing_name.clone()) {
            Some(known) if known.as_bytes() == name => Some(known),
            _ => std::str::from_utf8(name).ok(),
        }
    }
}

/// The part of `range` that lies in `content`; empty (and at 0) where none does.
fn within(content: &Range<usize>, range: Range<usize>) -> Range<usize> {
    let (start, end) = (range.start.max(content.start), range.end.min(content.end));
    if start < end { start..end } else { 0..0 }
}

/// The bytes of the escaped string (`\"…\"`) at `*at` in a literal, stepping past it, when
/// nothing in it is escaped: the same string in the line, for the line is the unescaped
/// literal. Not checked as UTF-8 here: the caller knows where it ends up.
fn plain_string<'l>(literal: &'l [u8], at: &mut usize) -> Option<&'l [u8]> {
    let start = *at + 2;
    if literal.get(*at..start)? != b"\\\"" {
        return None;
    }
    let end = start + first_special(literal.get(start..)?)?;
    if literal.get(end..end + 2)? != b"\\\"" {
        return None;
    }
    let text = literal.get(start..end)?;
    *at = end + 2;
    Some(text)
}

/// Whether `text` needs no escape in a string literal, and is ASCII as the frames write it.
fn is_plain(text: &[u8]) -> bool {
    text.is_ascii() && first_special(text).is_none()
}

/// Appends `text` as a frame's literal writes it, without the quotes.
fn push_escaped(out: &mut Vec<u8>, text: &str) {
    let literal = stream_literal(text);
    let inner = literal
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        .unwrap_or_default();
    out.extend_from_slice(inner.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::FrameDecoder;
    use crate::normalize::shape::tests::content;
    use crate::normalize::{Normalizer, read_dweet_text};
    use crate::protocol::encode_stream_frame;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// What a decoder makes of `frame` with `reader`, as text that tells -0 from 0.
    fn decoded(frame: &[u8], reader: &mut dyn ObjectReader<ReadDweet>) -> Vec<String> {
        let mut decoder = FrameDecoder::new();
        decoder.push(frame);
        let mut events: Vec<String> = std::iter::from_fn(|| decoder.next_event_read_by(reader))
            .map(|event| format!("{event:?}"))
            .collect();
        events.extend(
            decoder
                .finish_read_by(reader)
                .map(|event| format!("{event:?}")),
        );
        events
    }

    /// The literal of the frame, between its quotes, when it has them.
    fn literal_of(frame: &[u8]) -> Option<&[u8]> {
        let line = frame.split(|&byte| byte == b'\n').nth(1)?.trim_ascii();
        line.strip_prefix(b"\"")?.strip_suffix(b"\"")
    }

    /// A stream reader that has seen frames goes on decoding others (and plain lines) as the
    /// decoder and a fresh line reader do, whatever changes in them, damage included.
    #[test]
    fn a_frame_read_by_its_shape_is_read_as_its_unescaped_line_is() {
        let things = ["S5D9-0001", "S5D9-0002", r#"board "quoted""#, "café", ""];
        let mut rng = StdRng::seed_from_u64(26);
        let mut kept = StreamReader::default();
        let (mut by_shape, mut unescaped) = (0, 0);
        for round in 0..20_000 {
            let thing = match rng.random_range(0..20) {
                0 => things[rng.random_range(2..things.len())],
                pick => things[pick % 2],
            };
            let created = match rng.random_range(0..30) {
                0 => "yesterday".to_owned(),
                1 => "2026-13-01T00:00:00.000Z".to_owned(),
                _ => format!(
                    "2026-12-04T18:{:02}:{:02}.{:03}Z",
                    round / 1000 % 60,
                    round % 60,
                    round % 1000
                ),
            };
            let mut line = format!(
                r#"{{"thing":{},"created":{},"content":{}}}"#,
                serde_json::to_string(thing).unwrap_or_default(),
                serde_json::to_string(&created).unwrap_or_default(),
                content(&mut rng),
            );
            if round % 53 == 0 {
                line = line.replacen('{', r#"{"transaction":"t","#, 1);
            }
            // Now and then a plain line, as a server that streams NDJSON sends it: the text
            // reader's, and no frame's shape is built from it.
            let mut frame = if round % 11 == 0 {
                format!("{line}\n").into_bytes()
            } else {
                encode_stream_frame(&line)
            };
            if round % 7 == 0 {
                let at = rng.random_range(4..frame.len() - 2);
                // ASCII that means something in a frame, and bytes that are not UTF-8.
                let bytes = b"\\\"{}[]:,0-e tnu\xff\xc3";
                let byte = bytes[rng.random_range(0..bytes.len())];
                match rng.random_range(0..3) {
                    0 => frame[at] = byte,
                    1 => {
                        frame.remove(at);
                    }
                    _ => frame.insert(at, byte),
                }
            }
            let expected = decoded(&frame, &mut |json: &str| {
                read_dweet_text(json, &mut Normalizer::default())
            });
            let fits = literal_of(&frame).is_some_and(|literal| kept.frame.read(literal).is_some());
            assert_eq!(
                decoded(&frame, &mut kept),
                expected,
                "{}",
                String::from_utf8_lossy(&frame)
            );
            if fits {
                by_shape += 1;
            } else {
                unescaped += 1;
            }
        }
        assert!(
            by_shape > 5_000,
            "many frames were read by their shape: {by_shape}"
        );
        assert!(unescaped > 5_000, "and the rest unescaped: {unescaped}");
    }
}
