//! The `speed` limit of a job: a token bucket refilled at `speed` bytes/s
//! holding at most one slice (100 ms, QEMU's `BLOCK_JOB_SLICE_TIME`)
//! worth. Accounting is after the fact, like QEMU's: a job charges what it
//! issued and sleeps off any debt before issuing more.

use std::time::{Duration, Instant};

/// The slice the bucket holds at most, and the longest a job sleeps
/// before re-checking for commands.
pub const SLICE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct RateLimit {
    /// Bytes per second; 0 = unlimited.
    speed: u64,
    /// Bytes that may go without waiting (negative: debt).
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    pub fn new(speed: u64, now: Instant) -> RateLimit {
        let mut r = RateLimit { speed: 0, tokens: 0.0, last: now };
        r.set_speed(speed, now);
        r
    }

    pub fn speed(&self) -> u64 {
        self.speed
    }

    /// Changes the limit; a full slice is available at once.
    pub fn set_speed(&mut self, speed: u64, now: Instant) {
        self.speed = speed;
        self.tokens = self.slice_bytes();
        self.last = now;
    }

    fn slice_bytes(&self) -> f64 {
        self.speed as f64 * SLICE.as_secs_f64()
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.speed as f64).min(self.slice_bytes());
    }

    /// Charges `bytes` just issued.
    pub fn charge(&mut self, bytes: u64, now: Instant) {
        if self.speed == 0 {
            return;
        }
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    /// How long to wait before issuing more (zero when allowed now).
    pub fn delay(&mut self, now: Instant) -> Duration {
        if self.speed == 0 {
            return Duration::ZERO;
        }
        self.refill(now);
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / self.speed as f64) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a job issuing `chunk` bytes whenever allowed for `secs`
    /// seconds; returns bytes issued.
    fn simulate(speed: u64, chunk: u64, secs: u64) -> u64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut r = RateLimit::new(speed, now);
        let mut issued = 0;
        while now < t0 + Duration::from_secs(secs) {
            let d = r.delay(now);
            if d > Duration::ZERO {
                now += d;
                continue;
            }
            r.charge(chunk, now);
            issued += chunk;
        }
        issued
    }

    #[test]
    fn long_run_rate_is_within_ten_percent() {
        for (speed, chunk) in [(1 << 20, 64 << 10), (100 << 20, 1 << 20), (10 << 20, 4 << 20), (4096, 512)] {
            let secs = 20;
            let got = simulate(speed, chunk, secs) as f64 / secs as f64;
            let err = (got - speed as f64).abs() / speed as f64;
            assert!(err < 0.10, "speed {speed} chunk {chunk}: {got} B/s");
        }
    }

    #[test]
    fn zero_means_unlimited_and_changes_apply_at_once() {
        let now = Instant::now();
        let mut r = RateLimit::new(0, now);
        r.charge(1 << 30, now);
        assert_eq!(r.delay(now), Duration::ZERO);
        r.set_speed(1 << 20, now);
        r.charge(2 << 20, now);
        let d = r.delay(now);
        // One slice was free; the rest is debt at 1 MiB/s.
        assert!(d > Duration::from_millis(1800) && d < Duration::from_millis(2000), "{d:?}");
        r.set_speed(0, now);
        assert_eq!(r.delay(now), Duration::ZERO);
    }
}
