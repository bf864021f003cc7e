//! Helpers shared by the criterion benchmarks in `benches/`.

#![forbid(unsafe_code)]

use reactor::{PollMode, ReactorOptions, Reactors};

/// Reactors on up to `n` distinct cores (fewer if the machine has fewer),
/// polling: benchmarks measure the busy path, not wake-ups.
pub fn polling_reactors(n: usize) -> Reactors {
    let cores = reactor::cpuset::allowed_cores().expect("reading CPU affinity");
    let cores: Vec<usize> = cores.iter().copied().cycle().take(n).collect();
    Reactors::start(&cores, true, ReactorOptions { poll_mode: PollMode::Poll, ..Default::default() })
        .expect("starting reactors")
}
