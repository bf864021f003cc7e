//! bdevperf-style workloads on Spindle's reactors (in progress).

#![forbid(unsafe_code)]
