//! What every suite shares: criterion's settings, sized so the whole set runs in a few minutes
//! on a 2-core machine (20 samples, 1 s warm-up, 2 s of measurement per benchmark).

use std::time::Duration;

use criterion::Criterion;

/// The criterion configuration of every suite.
pub fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}
