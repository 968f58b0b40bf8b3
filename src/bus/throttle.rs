//! A log throttle that can be shared between tasks: at most one line per period, with the
//! number of lines held back since the last one. Used where bad input from Redis is logged
//! by several concurrent callers (the latest-value store); it only decides, never logs.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

pub struct Throttle {
    period: Duration,
    /// (when the next line may go out, lines held back since the last one)
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(number held back since the last line)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = Instant::now();
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.0.is_some_and(|next| now < next) {
            state.1 += 1;
            return None;
        }
        state.0 = Some(now + self.period);
        Some(std::mem::take(&mut state.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_and_the_count_of_those_held_back() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.state.lock().unwrap().0 = Some(Instant::now());
        assert_eq!(t.allow(), Some(2));
    }
}
