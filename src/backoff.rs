//! Reconnect delays: exponential with full jitter, capped, and reset once a connection has
//! been healthy for a while, so a fleet that loses its server does not come back in lockstep.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The next delay: uniform in `[0, min(max, min * 2^attempt)]`.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        ceiling.mul_f64(rng.random_range(0.0..=1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut rng = rand::rng();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let ceilings = [100u64, 200, 400, 800, 1600, 3200, 5000, 5000];
        for ceiling in ceilings {
            let delay = backoff.next_delay(&mut rng);
            assert!(
                delay <= Duration::from_millis(ceiling),
                "{delay:?} > {ceiling}ms"
            );
        }
        let many: Vec<_> = (0..50).map(|_| backoff.next_delay(&mut rng)).collect();
        assert!(
            many.iter().any(|d| *d < Duration::from_millis(2500)),
            "jittered, not fixed at the cap"
        );
        for _ in 0..100 {
            backoff.next_delay(&mut rng);
        }
        backoff.reset();
        assert!(backoff.next_delay(&mut rng) <= Duration::from_millis(100));
    }
}
