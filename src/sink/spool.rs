//! The spool's on-disk format: what a sink's backlog writes while its destination cannot take
//! records, and reads back when it can.
//!
//! A segment file is a header and a sequence of frames, one frame per record:
//!
//! ```text
//! header  "DWSPOOL" 0x00, version u16 LE
//! frame   magic u32 LE, payload length u32 LE, crc32c(payload) u32 LE, payload
//! payload kind u8, then the record's fields (strings as u32 length + UTF-8, i64/f64 LE,
//!         optional fields behind a presence byte)
//! ```
//!
//! Version 2 added a dweet's `created` text (optional, after `created_ms`), kept when it is
//! not the canonical spelling of its instant. Version 1 segments, from older builds, are still
//! read: their dweets had the canonical spelling.
//!
//! The format is its own type (`SpoolRecord`), not serde of the in-memory
//! [`Record`], so changing `Record` cannot silently change what old spools mean; a new layout
//! gets a new version. Reading is pure (bytes in, records and findings out): a frame whose
//! length runs past the end of the file is a torn append that was never acknowledged and is
//! ignored; a frame whose checksum or content is wrong is skipped, reported with its offset,
//! and reading resumes at the next frame magic, so one damaged record costs only itself.

use std::sync::Arc;

use crate::record::{DeadLetter, Normalized, Reading, Record};

/// The first bytes of every segment.
pub const HEADER_MAGIC: &[u8; 8] = b"DWSPOOL\0";
/// The layout written by this build.
pub const VERSION: u16 = 2;
/// The oldest layout this build still reads.
const OLDEST_READABLE: u16 = 1;
/// Header length: magic + version.
pub const HEADER_LEN: usize = HEADER_MAGIC.len() + 2;
/// Marks the start of a frame; what reading resynchronises on after damage.
const FRAME_MAGIC: u32 = 0xD5E1_7F0A;
const FRAME_HEAD: usize = 12;
/// No record is near this; a longer length is damage.
const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

const KIND_DWEET: u8 = 1;
const KIND_DEAD_LETTER: u8 = 2;

/// A frame's checksum: CRC-32C (Castagnoli), as segments written by every earlier build have.
fn checksum(payload: &[u8]) -> u32 {
    crc32c::crc32c(payload)
}

/// The segment header for a new file.
pub fn header() -> [u8; HEADER_LEN] {
    let mut bytes = [0; HEADER_LEN];
    bytes[..8].copy_from_slice(HEADER_MAGIC);
    bytes[8..].copy_from_slice(&VERSION.to_le_bytes());
    bytes
}

/// Appends one frame per record to `out`: each payload is written in place, and its frame's
/// head filled in behind it.
pub fn encode(records: &[Record], out: &mut Vec<u8>) {
    for record in records {
        let head = out.len();
        out.extend_from_slice(&[0; FRAME_HEAD]);
        SpoolRecord(record).write(out);
        let payload = &out[head + FRAME_HEAD..];
        let length = (payload.len() as u32).to_le_bytes();
        let sum = checksum(payload).to_le_bytes();
        let frame_head = &mut out[head..head + FRAME_HEAD];
        frame_head[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        frame_head[4..8].copy_from_slice(&length);
        frame_head[8..].copy_from_slice(&sum);
    }
}

/// A stretch of a segment that could not be read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// Byte offset of the damaged frame in the file.
    pub offset: usize,
    pub reason: String,
}

/// What a segment held.
#[derive(Debug, Default)]
pub struct Decoded {
    pub records: Vec<Record>,
    /// Damaged records in the middle: skipped, each one lost.
    pub damaged: Vec<Damage>,
    /// Bytes of a torn last append (never acknowledged), ignored.
    pub torn_tail: usize,
}

/// Why a whole segment cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a dweetpipe spool segment (the header is missing or wrong)")]
    NotASegment,
    #[error(
        "spool format version {0} is newer than this build reads ({VERSION}); run the newer dweetpipe to drain it"
    )]
    UnknownVersion(u16),
}

/// Reads a whole segment file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Decoded, FormatError> {
    let magic_prefix = &bytes[..bytes.len().min(HEADER_MAGIC.len())];
    if bytes.len() < HEADER_LEN && HEADER_MAGIC.starts_with(magic_prefix) {
        // Created, then cut short before its header was whole: it never held a record.
        return Ok(Decoded {
            torn_tail: bytes.len(),
            ..Decoded::default()
        });
    }
    if bytes.len() < HEADER_LEN || &bytes[..8] != HEADER_MAGIC {
        return Err(FormatError::NotASegment);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if !(OLDEST_READABLE..=VERSION).contains(&version) {
        return Err(FormatError::UnknownVersion(version));
    }
    let mut decoded = Decoded::default();
    let mut at = HEADER_LEN;
    while at < bytes.len() {
        let previous = match decoded.records.last() {
            Some(Record::Dweet(dweet)) => dweet.readings.as_slice(),
            _ => &[],
        };
        match frame_at(bytes, at, version, previous) {
            Frame::Record(record, next) => {
                decoded.records.push(record);
                at = next;
            }
            Frame::Torn => {
                // Only a tail with no good frame after it is a torn append.
                match next_magic(bytes, at + 1) {
                    Some(resume) => {
                        decoded.damaged.push(Damage {
                            offset: at,
                            reason: "the frame's length runs into the next frame".to_owned(),
                        });
                        at = resume;
                    }
                    None => {
                        decoded.torn_tail = bytes.len() - at;
                        break;
                    }
                }
            }
            Frame::Damaged(reason) => {
                decoded.damaged.push(Damage { offset: at, reason });
                match next_magic(bytes, at + 1) {
                    Some(resume) => at = resume,
                    None => break,
                }
            }
        }
    }
    Ok(decoded)
}

enum Frame {
    Record(Record, usize),
    Torn,
    Damaged(String),
}

/// The frame at `at`; `previous` are the readings of the dweet before it, whose sensor names
/// the frame's share where they are the same.
fn frame_at(bytes: &[u8], at: usize, version: u16, previous: &[Reading]) -> Frame {
    let Some(head) = bytes.get(at..at + FRAME_HEAD) else {
        return Frame::Torn;
    };
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    if word(0) != FRAME_MAGIC {
        return Frame::Damaged("no frame starts here".to_owned());
    }
    let length = word(4) as usize;
    if length > MAX_PAYLOAD {
        return Frame::Damaged(format!("implausible frame length {length}"));
    }
    let start = at + FRAME_HEAD;
    let Some(payload) = bytes.get(start..start + length) else {
        return Frame::Torn;
    };
    if checksum(payload) != word(8) {
        return Frame::Damaged("checksum mismatch".to_owned());
    }
    match SpoolRecord::read(payload, version, previous) {
        Some(record) => Frame::Record(record, start + length),
        None => Frame::Damaged("the checksum matches but the record does not parse".to_owned()),
    }
}

fn next_magic(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = FRAME_MAGIC.to_le_bytes();
    bytes
        .get(from..)?
        .windows(4)
        .position(|w| w == magic)
        .map(|i| from + i)
}

/// The on-disk encoding of one record.
struct SpoolRecord<'a>(&'a Record);

impl SpoolRecord<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self.0 {
            Record::Dweet(dweet) => {
                out.push(KIND_DWEET);
                put_str(out, &dweet.thing);
                out.extend_from_slice(&dweet.created_ms.to_le_bytes());
                put_opt_str(out, dweet.created_text.as_deref());
                out.extend_from_slice(&dweet.received_ms.to_le_bytes());
                put_str(out, &dweet.content);
                out.extend_from_slice(&(dweet.readings.len() as u32).to_le_bytes());
                for reading in &dweet.readings {
                    put_str(out, &reading.sensor);
                    out.extend_from_slice(&reading.value.to_le_bytes());
                }
            }
            Record::DeadLetter(letter) => {
                out.push(KIND_DEAD_LETTER);
                put_opt_str(out, letter.thing.as_deref());
                put_opt_str(out, letter.created.as_deref());
                match letter.created_ms {
                    Some(ms) => {
                        out.push(1);
                        out.extend_from_slice(&ms.to_le_bytes());
                    }
                    None => out.push(0),
                }
                out.extend_from_slice(&letter.received_ms.to_le_bytes());
                put_str(out, &letter.payload);
                put_str(out, &letter.reason);
            }
        }
    }

    /// Reads a record; a sensor named as the one at its place in `previous` shares its name
    /// (a fleet's dweets mostly name the same sensors in the same order): one allocation and
    /// UTF-8 check fewer per reading, and the Parquet sink knows the names by their address.
    fn read(payload: &[u8], version: u16, previous: &[Reading]) -> Option<Record> {
        let mut input = Reader(payload);
        let record = match input.u8()? {
            KIND_DWEET => {
                let thing = input.string()?;
                let created_ms = input.i64()?;
                let created_text = match version {
                    1 => None,
                    _ => input.opt_string()?.map(String::into_boxed_str),
                };
                let received_ms = input.i64()?;
                let content = input.string()?;
                let count = input.u32()? as usize;
                // Each reading takes at least 12 bytes: a count beyond that is damage.
                if count > input.0.len() / 12 {
                    return None;
                }
                let mut readings = Vec::with_capacity(count);
                for place in 0..count {
                    let sensor = input.sensor(previous.get(place))?;
                    let value = f64::from_le_bytes(input.take(8)?.try_into().ok()?);
                    readings.push(Reading { sensor, value });
                }
                Record::Dweet(Normalized {
                    thing,
                    created_ms,
                    created_text,
                    received_ms,
                    content,
                    readings,
                })
            }
            KIND_DEAD_LETTER => {
                let thing = input.opt_string()?;
                let created = input.opt_string()?;
                let created_ms = match input.u8()? {
                    0 => None,
                    1 => Some(input.i64()?),
                    _ => return None,
                };
                Record::DeadLetter(DeadLetter {
                    thing,
                    created,
                    created_ms,
                    received_ms: input.i64()?,
                    payload: input.string()?,
                    reason: input.string()?,
                })
            }
            _ => return None,
        };
        input.0.is_empty().then_some(record)
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_opt_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => {
            out.push(1);
            put_str(out, text);
        }
        None => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn i64(&mut self) -> Option<i64> {
        Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    /// The bytes of a field written as a u32 length and then that many bytes.
    fn prefixed(&mut self) -> Option<&'a [u8]> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.prefixed()?.to_vec()).ok()
    }

    /// A sensor's name: `known`'s when it is the same text.
    fn sensor(&mut self, known: Option<&Reading>) -> Option<Arc<str>> {
        let text = self.prefixed()?;
        match known {
            Some(reading) if reading.sensor.as_bytes() == text => Some(Arc::clone(&reading.sensor)),
            _ => std::str::from_utf8(text).ok().map(Arc::from),
        }
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => self.string().map(Some),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dweet(thing: &str, created_ms: i64) -> Record {
        Record::Dweet(Normalized {
            thing: thing.to_owned(),
            created_ms,
            created_text: None,
            received_ms: created_ms + 3,
            content: format!(r#"{{"n":{created_ms},"é":"ü"}}"#),
            readings: vec![
                Reading {
                    sensor: "n".into(),
                    value: created_ms as f64,
                },
                Reading {
                    sensor: "x.y".into(),
                    value: -0.1,
                },
            ],
        })
    }

    fn letter(created_ms: Option<i64>) -> Record {
        Record::DeadLetter(DeadLetter {
            thing: Some("t".to_owned()),
            created: created_ms.map(|ms| ms.to_string()),
            created_ms,
            received_ms: 9,
            payload: "[1,2]".to_owned(),
            reason: "not an object".to_owned(),
        })
    }

    fn segment(records: &[Record]) -> Vec<u8> {
        let mut bytes = header().to_vec();
        encode(records, &mut bytes);
        bytes
    }

    /// Offsets where each frame starts.
    fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
        let mut offsets = Vec::new();
        let mut at = HEADER_LEN;
        while let Frame::Record(_, next) = frame_at(bytes, at, VERSION, &[]) {
            offsets.push(at);
            at = next;
        }
        offsets
    }

    fn with_created_text(mut record: Record, text: &str) -> Record {
        if let Record::Dweet(dweet) = &mut record {
            dweet.created_text = Some(text.into());
        }
        record
    }

    #[test]
    fn records_round_trip_exactly() {
        let records = vec![
            dweet("a", 1),
            with_created_text(dweet("a", 2), "1970-01-01T01:00:00.002+01:00"),
            letter(Some(5)),
            letter(None),
            dweet("b", i64::MIN),
        ];
        let decoded = decode(&segment(&records)).unwrap();
        assert_eq!(decoded.records, records);
        assert!(decoded.damaged.is_empty());
        assert_eq!(decoded.torn_tail, 0);
    }

    #[test]
    fn a_dweet_shares_the_sensor_names_of_the_dweet_before_it_where_they_match() {
        let with_sensors = |thing: &str, sensors: &[&str]| {
            let mut record = dweet(thing, 1);
            if let Record::Dweet(dweet) = &mut record {
                dweet.readings = sensors
                    .iter()
                    .map(|&sensor| Reading {
                        sensor: sensor.into(),
                        value: 1.0,
                    })
                    .collect();
            }
            record
        };
        let records = vec![
            with_sensors("a", &["t", "h"]),
            with_sensors("b", &["t", "h", "p"]),
            with_sensors("c", &["h", "t"]),
            letter(None),
            with_sensors("d", &["h", "t"]),
        ];
        let decoded = decode(&segment(&records)).unwrap();
        assert_eq!(decoded.records, records);
        let sensors: Vec<Vec<Arc<str>>> = decoded
            .records
            .iter()
            .map(|record| match record {
                Record::Dweet(dweet) => dweet.readings.iter().map(|r| r.sensor.clone()).collect(),
                Record::DeadLetter(_) => Vec::new(),
            })
            .collect();
        let shared = |(from, at): (usize, usize), (to, to_at): (usize, usize)| {
            Arc::ptr_eq(&sensors[from][at], &sensors[to][to_at])
        };
        // The same names in the same places: shared.
        assert!(shared((0, 0), (1, 0)) && shared((0, 1), (1, 1)));
        // Other names at a place, or nothing before (a dead letter): read anew.
        assert!(!shared((1, 0), (2, 1)) && !shared((1, 1), (2, 0)));
        assert!(!shared((2, 0), (4, 0)) && !shared((2, 1), (4, 1)));
    }

    #[test]
    fn a_torn_last_frame_is_ignored_not_reported() {
        let records: Vec<Record> = (0..5).map(|i| dweet("a", i)).collect();
        let bytes = segment(&records);
        for cut in [
            bytes.len() - 1,
            bytes.len() - 20,
            frame_offsets(&bytes)[4] + 3,
        ] {
            let decoded = decode(&bytes[..cut]).unwrap();
            assert_eq!(decoded.records, records[..4], "cut at {cut}");
            assert!(decoded.damaged.is_empty());
            assert!(decoded.torn_tail > 0);
        }
    }

    #[test]
    fn a_damaged_middle_record_is_skipped_and_reported_and_the_rest_replays() {
        let records: Vec<Record> = (0..9).map(|i| dweet("a", i)).collect();
        let clean = segment(&records);
        let offsets = frame_offsets(&clean);
        // A flipped byte anywhere inside frame 4: its head, its length, its payload.
        for inside in [0, 2, 5, 9, 13, 30] {
            let mut bytes = clean.clone();
            bytes[offsets[4] + inside] ^= 0x5a;
            let decoded = decode(&bytes).unwrap();
            let mut expected = records.clone();
            expected.remove(4);
            assert_eq!(decoded.records, expected, "damage at +{inside}");
            assert_eq!(decoded.damaged.len(), 1, "damage at +{inside}");
            assert_eq!(decoded.damaged[0].offset, offsets[4]);
        }
    }

    #[test]
    fn foreign_and_future_files_are_refused_whole() {
        assert_eq!(
            decode(b"{\"Dweet\":{}}\n").unwrap_err(),
            FormatError::NotASegment
        );
        let mut future = segment(&[dweet("a", 1)]);
        future[8] = 9;
        assert_eq!(decode(&future).unwrap_err(), FormatError::UnknownVersion(9));
        assert_eq!(
            decode(b"DWSP0").unwrap_err(),
            FormatError::NotASegment,
            "a short file that is not the start of a header is foreign"
        );
    }

    #[test]
    fn lengths_and_counts_past_their_bounds_are_damage_not_allocations() {
        let records: Vec<Record> = (0..3).map(|i| dweet("a", i)).collect();
        let clean = segment(&records);
        let offsets = frame_offsets(&clean);

        // A frame claiming more than MAX_PAYLOAD bytes: refused before anything is read.
        let mut bytes = clean.clone();
        let huge = (MAX_PAYLOAD as u32 + 1).to_le_bytes();
        bytes[offsets[1] + 4..offsets[1] + 8].copy_from_slice(&huge);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(
            decoded.records,
            vec![records[0].clone(), records[2].clone()]
        );
        assert_eq!(decoded.damaged.len(), 1);
        assert!(
            decoded.damaged[0]
                .reason
                .contains("implausible frame length")
        );

        // A reading count beyond what the payload can hold, with a checksum that matches:
        // the record does not parse (no vector of that size is made).
        let mut payload = vec![KIND_DWEET];
        put_str(&mut payload, "a");
        payload.extend_from_slice(&7i64.to_le_bytes());
        put_opt_str(&mut payload, None);
        payload.extend_from_slice(&8i64.to_le_bytes());
        put_str(&mut payload, "{}");
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        let mut bytes = header().to_vec();
        bytes.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&checksum(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        encode(&records[..1], &mut bytes);
        let decoded = decode(&bytes).unwrap();
        assert_eq!(decoded.records, records[..1]);
        assert_eq!(decoded.damaged.len(), 1);
        assert!(decoded.damaged[0].reason.contains("does not parse"));
    }

    #[test]
    fn a_version_1_segment_from_an_older_build_still_drains() {
        // Laid out by hand as version 1 wrote a dweet: no `created` text after `created_ms`.
        let mut payload = vec![KIND_DWEET];
        put_str(&mut payload, "board");
        payload.extend_from_slice(&1_000i64.to_le_bytes());
        payload.extend_from_slice(&1_003i64.to_le_bytes());
        put_str(&mut payload, r#"{"v":1}"#);
        payload.extend_from_slice(&1u32.to_le_bytes());
        put_str(&mut payload, "v");
        payload.extend_from_slice(&1.0f64.to_le_bytes());
        let mut bytes = HEADER_MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&checksum(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let decoded = decode(&bytes).unwrap();
        assert!(decoded.damaged.is_empty());
        let expected = Normalized {
            thing: "board".to_owned(),
            created_ms: 1_000,
            created_text: None,
            received_ms: 1_003,
            content: r#"{"v":1}"#.to_owned(),
            readings: vec![Reading {
                sensor: "v".into(),
                value: 1.0,
            }],
        };
        assert_eq!(decoded.records, vec![Record::Dweet(expected)]);
        // The same payload read as version 2 is one field short: its layout is not guessed.
        assert!(SpoolRecord::read(&payload, 2, &[]).is_none());
    }

    #[test]
    fn frames_are_checksummed_with_crc_32c_as_older_builds_wrote_them() {
        // The catalogue's check value of CRC-32/ISCSI, and a short payload's checksum as the
        // `crc` crate that earlier builds used computes it: a different polynomial or bit
        // order would make every spooled record damage.
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum(&[KIND_DWEET, 0, 0, 0, 0]), 0x7D63_1999);
    }

    #[test]
    fn a_header_cut_short_is_a_torn_append_holding_nothing() {
        // A crash between creating a segment and writing its header: nothing in it was ever
        // acknowledged.
        let mut version_1 = header();
        version_1[8..].copy_from_slice(&1u16.to_le_bytes());
        for written in [header(), version_1] {
            for cut in 0..HEADER_LEN {
                let decoded = decode(&written[..cut]).unwrap();
                assert!(decoded.records.is_empty() && decoded.damaged.is_empty());
                assert_eq!(decoded.torn_tail, cut);
            }
        }
    }
}
