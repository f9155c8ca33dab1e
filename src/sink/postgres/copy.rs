//! Records as COPY text-format rows: tab-separated, `\N` for NULL, backslash escapes.

use std::fmt::Write;

use crate::record::{Normalized, ms_to_datetime};

/// The COPY buffers of one batch.
#[derive(Default)]
pub struct CopyRows {
    pub dweets: String,
    pub readings: String,
}

impl CopyRows {
    pub fn push_dweet(&mut self, dweet: &Normalized) {
        let created = timestamp(dweet.created_ms);
        push_field(&mut self.dweets, &dweet.thing);
        self.dweets.push('\t');
        self.dweets.push_str(&created);
        self.dweets.push('\t');
        self.dweets.push_str(&timestamp(dweet.received_ms));
        self.dweets.push('\t');
        push_field(&mut self.dweets, &dweet.content);
        self.dweets.push('\n');
        for reading in &dweet.readings {
            self.readings.push_str(&created);
            self.readings.push('\t');
            push_field(&mut self.readings, &dweet.thing);
            self.readings.push('\t');
            push_field(&mut self.readings, &reading.sensor);
            // f64's Display is the shortest text that reads back to the same value.
            let _ = writeln!(self.readings, "\t{}", reading.value);
        }
    }
}

/// PostgreSQL text cannot hold NUL; a dead letter must always be storable, so NUL becomes
/// U+FFFD there (dweets and readings keep theirs and are refused, then dead-lettered).
pub fn without_nul(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}").into()
    } else {
        text.into()
    }
}

pub fn timestamp(ms: i64) -> String {
    ms_to_datetime(ms)
        .format("%Y-%m-%d %H:%M:%S%.3f+00")
        .to_string()
}

fn push_field(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Reading;

    #[test]
    fn rows_are_escaped_copy_text() {
        let mut rows = CopyRows::default();
        rows.push_dweet(&Normalized {
            thing: "a\tb".to_owned(),
            created_ms: 1_395_225_526_010,
            received_ms: 1_395_225_526_020,
            content: "{\"s\":\"x\\\\y\\n\"}".to_owned(),
            readings: vec![Reading {
                sensor: "v".into(),
                value: 0.1,
            }],
        });
        assert_eq!(
            rows.dweets,
            "a\\tb\t2014-03-19 10:38:46.010+00\t2014-03-19 10:38:46.020+00\t{\"s\":\"x\\\\\\\\y\\\\n\"}\n"
        );
        assert_eq!(rows.readings, "2014-03-19 10:38:46.010+00\ta\\tb\tv\t0.1\n");
        assert_eq!(without_nul("nul\0here"), "nul\u{FFFD}here");
    }
}
