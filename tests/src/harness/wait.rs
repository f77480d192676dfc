//! Bounded waiting.

use std::time::{Duration, Instant};

/// Call `probe` every `interval` until it returns `Some`, for at most
/// `timeout`; `None` when the deadline passed first.
pub fn eventually<T>(
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return Some(v);
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(interval.min(timeout.saturating_sub(start.elapsed())));
    }
}
