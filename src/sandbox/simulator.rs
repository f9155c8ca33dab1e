//! A simulated fleet of Renesas S5D9 boards: payloads of the boards' exact shape with drifting,
//! plausible values and a rising `dweet-count`, plus (on request) the odd payloads real
//! fleets send — missing sensors, strings, nulls, extra nesting — so that everything
//! downstream is exercised by what it will meet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;

use crate::client::{Client, Key};

/// One board's state between dweets.
#[derive(Debug, Clone)]
pub struct S5d9Board {
    rng: SmallRng,
    dweet_count: u64,
    temperature_c: f64,
    humidity: f64,
    pressure: f64,
    accel: [f64; 3],
    mag: [f64; 3],
    sound: f64,
    led: bool,
}

impl S5d9Board {
    /// A board whose values are reproducible from `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        S5d9Board {
            dweet_count: rng.random_range(0..2000),
            temperature_c: rng.random_range(18.0..32.0),
            humidity: rng.random_range(25.0..60.0),
            pressure: rng.random_range(995.0..1030.0),
            accel: [0.02, 0.31, 0.97],
            mag: [
                rng.random_range(-90.0..-60.0),
                rng.random_range(20.0..50.0),
                rng.random_range(-190.0..-160.0),
            ],
            sound: rng.random_range(0.0..5.0),
            led: false,
            rng,
        }
    }

    /// The next regular dweet, exactly the shape the boards send.
    pub fn next_payload(&mut self) -> Value {
        // Plain numbers and one text: nothing in it can fail to become JSON.
        serde_json::to_value(self.next_content()).unwrap_or(Value::Null)
    }

    /// The next regular dweet as a typed value: what the fleet sends, serialised straight to
    /// its JSON text without building a tree first.
    pub fn next_content(&mut self) -> S5d9Content {
        self.step();
        let temperature_c = self.temperature_c.round();
        S5d9Content {
            globals: S5d9Globals {
                application: "DweetS5D9Client",
                dweet_count: self.dweet_count,
            },
            sensors: S5d9Sensors {
                accel_x: round2(self.accel[0]),
                accel_y: round2(self.accel[1]),
                accel_z: round2(self.accel[2]),
                humidity: self.humidity.round() as i64,
                led: i64::from(self.led),
                mag_x: self.mag[0].round() as i64,
                mag_y: self.mag[1].round() as i64,
                mag_z: self.mag[2].round() as i64,
                pressure: self.pressure.round() as i64,
                sound_level: self.sound.round() as i64,
                temperature_c: temperature_c as i64,
                temperature_f: (temperature_c * 9.0 / 5.0 + 32.0).round() as i64,
            },
        }
    }

    /// An irregular dweet, one of the kinds real fleets produce, chosen at random.
    pub fn odd_payload(&mut self) -> Value {
        let mut payload = self.next_payload();
        let kind = self.rng.random_range(0..5);
        let sensors = &mut payload["sensors"];
        match kind {
            0 => {
                if let Some(map) = sensors.as_object_mut() {
                    map.retain(|name, _| name.starts_with("Temp"));
                }
            }
            1 => sensors["Humidity"] = json!("n/a"),
            2 => {
                sensors["Pressure"] = Value::Null;
                sensors["SoundLevel"] = Value::Null;
            }
            3 => {
                let accel =
                    json!({"X": sensors["AccelX"], "Y": sensors["AccelY"], "Z": sensors["AccelZ"]});
                sensors["Accel"] = json!({ "raw": accel, "calibrated": true });
            }
            _ => payload["globals"]["firmware"] = json!({"version": "1.2.3", "ok": true}),
        }
        payload
    }

    fn step(&mut self) {
        let rng = &mut self.rng;
        self.dweet_count += 1;
        self.temperature_c = (self.temperature_c + rng.random_range(-0.3..0.3)).clamp(-10.0, 60.0);
        self.humidity = (self.humidity + rng.random_range(-0.8..0.8)).clamp(5.0, 95.0);
        self.pressure = (self.pressure + rng.random_range(-0.5..0.5)).clamp(950.0, 1050.0);
        for axis in &mut self.accel {
            *axis = (*axis + rng.random_range(-0.02..0.02)).clamp(-2.0, 2.0);
        }
        for axis in &mut self.mag {
            *axis += rng.random_range(-1.5..1.5);
        }
        self.sound = (self.sound + rng.random_range(-0.7..0.7)).clamp(0.0, 100.0);
        if rng.random_bool(0.05) {
            self.led = !self.led;
        }
    }
}

/// A regular S5D9 dweet's content; its fields serialise in the boards' key order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct S5d9Content {
    pub globals: S5d9Globals,
    pub sensors: S5d9Sensors,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct S5d9Globals {
    pub application: &'static str,
    #[serde(rename = "dweet-count")]
    pub dweet_count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct S5d9Sensors {
    pub accel_x: f64,
    pub accel_y: f64,
    pub accel_z: f64,
    pub humidity: i64,
    #[serde(rename = "LED")]
    pub led: i64,
    pub mag_x: i64,
    pub mag_y: i64,
    pub mag_z: i64,
    pub pressure: i64,
    pub sound_level: i64,
    pub temperature_c: i64,
    pub temperature_f: i64,
}

fn round2(value: f64) -> f64 {
    (value * 100.0).round() / 100.0
}

/// The thing name of board `index` (1-based): `S5D9-0001` with the default prefix.
pub fn thing_name(prefix: &str, index: usize) -> String {
    format!("{prefix}{index:04}")
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub things: usize,
    pub interval: Duration,
    /// Dweets per thing, then stop; `None` runs until cancelled.
    pub count: Option<u64>,
    pub prefix: String,
    pub key: Option<Key>,
    /// Every `odd_every`-th dweet of a board is an odd one.
    pub odd_every: Option<u64>,
    /// Seeds the boards, so two runs with the same seed send the same values.
    pub seed: u64,
    /// At most this many dweets in flight, so this many keep-alive connections carry the
    /// whole fleet. A connection per board costs both ends a cold socket per dweet: at
    /// 10,000 boards that took more CPU than the dweets themselves.
    pub connections: usize,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            things: 20,
            interval: Duration::from_secs(1),
            count: None,
            prefix: "S5D9-".to_owned(),
            key: None,
            odd_every: None,
            seed: 0x5D9,
            connections: DEFAULT_CONNECTIONS,
        }
    }
}

/// [`FleetConfig::connections`] unless set: enough that a sandbox on loopback answering in
/// a millisecond takes 10,000 dweets a second from them.
pub const DEFAULT_CONNECTIONS: usize = 64;

/// Counters of a running fleet, shared with whoever shows progress.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    /// Set by [`FleetStats::stop`]: boards finish the dweet in flight and stop.
    stopping: std::sync::atomic::AtomicBool,
}

impl FleetStats {
    /// Asks every board to stop after the dweet it is sending, so `sent` counts every dweet
    /// the server took (aborting the fleet would lose the count of those in flight).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Runs the fleet until every board sent `count` dweets (forever without a count). Boards
/// start at random offsets within one interval so they do not dweet in lockstep. The first
/// few failures are logged; all are counted.
pub async fn run_fleet(client: Client, config: FleetConfig, stats: Arc<FleetStats>) {
    let mut boards = JoinSet::new();
    let in_flight = Arc::new(Semaphore::new(config.connections.max(1)));
    for index in 1..=config.things {
        let client = client.clone();
        let config = config.clone();
        let stats = Arc::clone(&stats);
        let in_flight = Arc::clone(&in_flight);
        boards.spawn(async move {
            let thing = thing_name(&config.prefix, index);
            let mut board = S5d9Board::new(config.seed.wrapping_add(index as u64));
            let offset = config.interval.mul_f64(board.rng.random_range(0.0..1.0));
            tokio::time::sleep(offset).await;
            let mut ticks = tokio::time::interval(config.interval);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut sent = 0u64;
            while config.count.is_none_or(|count| sent < count) {
                ticks.tick().await;
                if stats.stopping.load(Ordering::Relaxed) {
                    break;
                }
                sent += 1;
                let odd = config
                    .odd_every
                    .is_some_and(|every| every > 0 && sent.is_multiple_of(every));
                // Quietly: the answer's copy of the dweet is never read, so the server need
                // not write it nor the fleet parse it.
                let key = config.key.as_ref();
                // Never closed, so the permit always comes.
                let _permit = in_flight.acquire().await;
                let sent_ok = if odd {
                    client
                        .dweet_quietly_for(&thing, &board.odd_payload(), key)
                        .await
                } else {
                    client
                        .dweet_quietly_for(&thing, &board.next_content(), key)
                        .await
                };
                match sent_ok {
                    Ok(()) => stats.sent.fetch_add(1, Ordering::Relaxed),
                    Err(error) => {
                        let failures = stats.failed.fetch_add(1, Ordering::Relaxed);
                        if failures < 10 {
                            tracing::warn!(%thing, %error, "simulated dweet failed");
                        }
                        failures
                    }
                };
            }
        });
    }
    while boards.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_has_the_boards_exact_shape() {
        let mut board = S5d9Board::new(7);
        let first = board.next_payload();
        let second = board.next_payload();
        let keys: Vec<&str> = first["sensors"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "AccelX",
                "AccelY",
                "AccelZ",
                "Humidity",
                "LED",
                "MagX",
                "MagY",
                "MagZ",
                "Pressure",
                "SoundLevel",
                "TemperatureC",
                "TemperatureF"
            ]
        );
        assert_eq!(first["globals"]["application"], "DweetS5D9Client");
        assert_eq!(
            second["globals"]["dweet-count"].as_u64().unwrap(),
            first["globals"]["dweet-count"].as_u64().unwrap() + 1
        );
        let c = first["sensors"]["TemperatureC"].as_i64().unwrap();
        let f = first["sensors"]["TemperatureF"].as_i64().unwrap();
        assert!((f - (c * 9 / 5 + 32)).abs() <= 1, "{c}C vs {f}F");
    }

    #[test]
    fn values_drift_but_stay_plausible() {
        let mut board = S5d9Board::new(1);
        for _ in 0..10_000 {
            let payload = board.next_payload();
            let t = payload["sensors"]["TemperatureC"].as_i64().unwrap();
            let h = payload["sensors"]["Humidity"].as_i64().unwrap();
            assert!((-10..=60).contains(&t) && (5..=95).contains(&h));
        }
    }

    #[test]
    fn same_seed_same_values() {
        assert_eq!(
            S5d9Board::new(3).next_payload(),
            S5d9Board::new(3).next_payload()
        );
    }

    #[test]
    fn odd_payloads_differ_from_regular_ones() {
        let mut board = S5d9Board::new(5);
        let regular_keys = board.next_payload()["sensors"].as_object().unwrap().len();
        let odd: Vec<Value> = (0..50).map(|_| board.odd_payload()).collect();
        assert!(
            odd.iter()
                .any(|p| p["sensors"].as_object().unwrap().len() < regular_keys)
        );
        assert!(odd.iter().any(|p| p["sensors"]["Humidity"].is_string()));
        assert!(odd.iter().any(|p| p["sensors"]["Pressure"].is_null()));
        assert!(odd.iter().any(|p| p["sensors"]["Accel"]["raw"].is_object()));
    }
}
