//! The board and sensor names of the readings rows, kept as keys into a file's table of the
//! names it has seen rather than as text copied onto every row.
//!
//! A dweet's board repeats on each of its readings and a board sends the same sensors dweet
//! after dweet, so the text of a readings file's `thing` and `sensor` columns is a few dozen
//! names over and over. The rows hold a `u32` key each; a batch hands Parquet each column as
//! a dictionary array over the names, which `parquet` writes into the file's text column as
//! the text (arrow-rs #8005): the file is the same as if the text had been copied.
//!
//! A board's sensors are found without hashing them: its normaliser shares one `Arc` per
//! name across its dweets, so the names of its last dweet are matched by address.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, StringBuilder};
use arrow_array::types::UInt32Type;
use arrow_array::{Array, ArrayRef, DictionaryArray, StringArray, UInt32Array};
use arrow_schema::ArrowError;

use crate::record::Reading;

/// The names of one file's readings rows, and the keys the rows hold for them.
#[derive(Default)]
pub struct NameKeys {
    boards: HashMap<Box<str>, Board, foldhash::fast::RandomState>,
    board_texts: Texts,
    sensors: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    sensor_texts: Texts,
}

struct Board {
    key: u32,
    /// The sensor names of the board's last dweet, each with its key. Holding the `Arc`s
    /// keeps their addresses from being reused by another name.
    last_sensors: Vec<(Arc<str>, u32)>,
}

impl NameKeys {
    /// Appends `thing`'s key once per reading to `things`, and each reading's sensor key to
    /// `sensors`.
    pub fn push(
        &mut self,
        thing: &str,
        readings: &[Reading],
        things: &mut Vec<u32>,
        sensors: &mut Vec<u32>,
    ) {
        let board = match self.boards.get_mut(thing) {
            Some(board) => board,
            None => {
                let key = self.board_texts.add(thing);
                self.boards.entry(thing.into()).or_insert(Board {
                    key,
                    last_sensors: Vec::new(),
                })
            }
        };
        things.resize(things.len() + readings.len(), board.key);
        let last = &mut board.last_sensors;
        let same_as_last = last.len() == readings.len()
            && last
                .iter()
                .zip(readings)
                .all(|((name, _), reading)| Arc::ptr_eq(name, &reading.sensor));
        if same_as_last {
            sensors.extend(last.iter().map(|(_, key)| *key));
            return;
        }
        last.clear();
        for reading in readings {
            let key = match self.sensors.get(&*reading.sensor) {
                Some(key) => *key,
                None => {
                    let key = self.sensor_texts.add(&reading.sensor);
                    self.sensors.insert(reading.sensor.as_ref().into(), key);
                    key
                }
            };
            last.push((Arc::clone(&reading.sensor), key));
            sensors.push(key);
        }
    }

    /// `keys` (taken from the rows) as the board column of a batch.
    pub fn things_column(&mut self, keys: Vec<u32>) -> Result<ArrayRef, ArrowError> {
        self.board_texts.column(keys)
    }

    /// `keys` (taken from the rows) as the sensor column of a batch.
    pub fn sensors_column(&mut self, keys: Vec<u32>) -> Result<ArrayRef, ArrowError> {
        self.sensor_texts.column(keys)
    }
}

/// Distinct names in the order first seen; a name's key is its position.
#[derive(Default)]
struct Texts {
    builder: StringBuilder,
    /// `builder`'s names as an array, made again only once names were added since.
    finished: Option<Arc<StringArray>>,
}

impl Texts {
    /// Adds a name not seen before and returns its key.
    fn add(&mut self, name: &str) -> u32 {
        // Past u32::MAX distinct names the file would have been sealed long before: a
        // generation holds minutes of a fleet.
        let key = u32::try_from(self.builder.len()).unwrap_or(u32::MAX);
        self.builder.append_value(name);
        key
    }

    fn column(&mut self, keys: Vec<u32>) -> Result<ArrayRef, ArrowError> {
        let texts = match &self.finished {
            Some(texts) if texts.len() == self.builder.len() => Arc::clone(texts),
            _ => {
                let texts = Arc::new(self.builder.finish_cloned());
                self.finished = Some(Arc::clone(&texts));
                texts
            }
        };
        let keys = UInt32Array::new(keys.into(), None);
        Ok(Arc::new(DictionaryArray::<UInt32Type>::try_new(
            keys, texts,
        )?))
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use arrow_array::Array;
    use arrow_array::cast::AsArray;

    /// The names a keyed column's rows stand for, in order: what Parquet writes as its text.
    pub(in crate::sink::parquet) fn texts(column: &ArrayRef) -> Vec<String> {
        let dictionary = column.as_dictionary::<UInt32Type>();
        let names = dictionary.values().as_string::<i32>();
        dictionary
            .keys()
            .values()
            .iter()
            .map(|key| names.value(usize::try_from(*key).unwrap()).to_owned())
            .collect()
    }

    fn readings(names: &[&Arc<str>]) -> Vec<Reading> {
        names
            .iter()
            .map(|name| Reading {
                sensor: Arc::clone(name),
                value: 0.0,
            })
            .collect()
    }

    #[test]
    fn names_come_back_as_pushed_across_batches_boards_and_changing_sensors() {
        let (t, h, p) = (Arc::from("t"), Arc::from("h"), Arc::from("p"));
        // The same text in another allocation, as another board's normaliser holds it.
        let other_t: Arc<str> = Arc::from("t");
        let mut keys = NameKeys::default();
        let (mut things, mut sensors) = (Vec::new(), Vec::new());
        let mut expected = (Vec::new(), Vec::new());
        let pushes: Vec<(&str, Vec<Reading>)> = vec![
            ("a", readings(&[&t, &h])),
            ("b", readings(&[&other_t])),
            ("a", readings(&[&t, &h])),
            // A board whose dweet has fewer, then other, then reordered sensors.
            ("a", readings(&[&t])),
            ("a", readings(&[&p, &h])),
            ("a", readings(&[&h, &p])),
            ("b", readings(&[])),
            ("b", readings(&[&other_t])),
        ];
        for round in 0..2 {
            for (thing, dweet) in &pushes {
                keys.push(thing, dweet, &mut things, &mut sensors);
                for reading in dweet {
                    expected.0.push(thing.to_string());
                    expected.1.push(reading.sensor.to_string());
                }
            }
            let things_column = keys.things_column(std::mem::take(&mut things)).unwrap();
            let sensors_column = keys.sensors_column(std::mem::take(&mut sensors)).unwrap();
            assert_eq!(texts(&things_column), expected.0, "round {round}");
            assert_eq!(texts(&sensors_column), expected.1, "round {round}");
            assert_eq!(things_column.null_count(), 0);
            expected = (Vec::new(), Vec::new());
        }
        // Equal names share a key whichever allocation they came in.
        assert_eq!(keys.sensors.len(), 3);
        assert_eq!(keys.boards.len(), 2);
    }
}
