//! Results of a run: per job and total, the latency summary, and the merged
//! histogram in HdrHistogram's text "percentile distribution" format.

use std::io::Write;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::job::{JobOutcome, new_histogram};
use crate::workload::Workload;

const NS_PER_US: f64 = 1_000.0;
const BYTES_PER_MIB: f64 = (1u64 << 20) as f64;
/// Percentile steps per halving of the distance to 100 % in the text
/// distribution: HdrHistogram's own default.
const DISTRIBUTION_TICKS_PER_HALF_DISTANCE: u32 = 5;

/// Latency of the counted requests, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub avg: f64,
    pub min: f64,
    pub max: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub p99_99: f64,
}

/// Rates and latency over a measured window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Length of the measured window, seconds.
    pub runtime_s: f64,
    /// Requests that succeeded in the window.
    pub ios: u64,
    pub bytes: u64,
    /// Requests that failed in the window (errors and verify mismatches).
    pub failures: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub fail_s: f64,
    pub latency_us: Latency,
}

/// One job's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    pub job: usize,
    /// The core of the job's reactor, when pinned.
    pub core: Option<usize>,
    pub workload: Workload,
    pub queue_depth: u32,
    pub io_size: u64,
    /// The job's slice of the node.
    pub offset: u64,
    pub size: u64,
    #[serde(flatten)]
    pub stats: Stats,
    /// The first I/O error, as text; prefill and warm-up included, so an
    /// error there shows even when no counted request failed.
    pub first_error: Option<String>,
    /// Verify: device offset of the first byte that read back wrong (warm-up included).
    pub first_mismatch_offset: Option<u64>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub jobs: Vec<JobResult>,
    /// Rates summed over the jobs; latency of every job's requests together.
    pub total: Stats,
    /// Every job's latencies merged (nanoseconds); not serialised.
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
}

/// What a job was given, for its row of the report.
pub(crate) struct JobShape {
    pub core: Option<usize>,
    pub workload: Workload,
    pub queue_depth: u32,
    pub io_size: u64,
    pub offset: u64,
    pub size: u64,
}

fn us(ns: u64) -> f64 {
    ns as f64 / NS_PER_US
}

fn per_second(n: f64, runtime: Duration) -> f64 {
    if runtime.is_zero() { 0.0 } else { n / runtime.as_secs_f64() }
}

/// The percentiles of `h` and the exact average, minimum and maximum.
fn latency(h: &Histogram<u64>, sum_ns: u64, min_ns: u64, max_ns: u64) -> Latency {
    let n = h.len();
    if n == 0 {
        return Latency::default();
    }
    Latency {
        avg: sum_ns as f64 / n as f64 / NS_PER_US,
        min: us(min_ns),
        max: us(max_ns),
        p50: us(h.value_at_quantile(0.5)),
        p90: us(h.value_at_quantile(0.9)),
        p99: us(h.value_at_quantile(0.99)),
        p99_9: us(h.value_at_quantile(0.999)),
        p99_99: us(h.value_at_quantile(0.9999)),
    }
}

fn stats(runtime: Duration, ios: u64, bytes: u64, failures: u64, latency_us: Latency) -> Stats {
    Stats {
        runtime_s: runtime.as_secs_f64(),
        ios,
        bytes,
        failures,
        iops: per_second(ios as f64, runtime),
        mib_s: per_second(bytes as f64 / BYTES_PER_MIB, runtime),
        fail_s: per_second(failures as f64, runtime),
        latency_us,
    }
}

impl Report {
    /// Builds the report from each job's outcome (in job order).
    pub(crate) fn build(node: &str, jobs: Vec<(JobShape, JobOutcome)>) -> Report {
        let mut merged = new_histogram();
        let (mut ios, mut bytes, mut failures, mut sum_ns) = (0u64, 0u64, 0u64, 0u64);
        let (mut min_ns, mut max_ns) = (u64::MAX, 0u64);
        let (mut iops, mut mib_s, mut fail_s) = (0.0, 0.0, 0.0);
        let mut runtime = Duration::ZERO;
        let mut rows = Vec::with_capacity(jobs.len());
        for (index, (shape, o)) in jobs.into_iter().enumerate() {
            // Same bounds everywhere, so adding never resizes or fails.
            merged.add(&o.histogram).expect("job histograms share their bounds");
            let lat = latency(&o.histogram, o.latency_sum_ns, o.latency_min_ns, o.latency_max_ns);
            let s = stats(o.runtime, o.ios, o.bytes, o.failures, lat);
            ios += o.ios;
            bytes += o.bytes;
            failures += o.failures;
            sum_ns = sum_ns.saturating_add(o.latency_sum_ns);
            if o.ios > 0 {
                min_ns = min_ns.min(o.latency_min_ns);
                max_ns = max_ns.max(o.latency_max_ns);
            }
            // Jobs run side by side: their rates add up (as bdevperf's total).
            iops += s.iops;
            mib_s += s.mib_s;
            fail_s += s.fail_s;
            runtime = runtime.max(o.runtime);
            rows.push(JobResult {
                job: index,
                core: shape.core,
                workload: shape.workload,
                queue_depth: shape.queue_depth,
                io_size: shape.io_size,
                offset: shape.offset,
                size: shape.size,
                stats: s,
                first_error: o.first_error.map(|e| e.to_string()),
                first_mismatch_offset: o.first_mismatch,
            });
        }
        let total_latency = latency(&merged, sum_ns, if ios == 0 { 0 } else { min_ns }, max_ns);
        let total = Stats { iops, mib_s, fail_s, ..stats(runtime, ios, bytes, failures, total_latency) };
        Report { node: node.to_string(), jobs: rows, total, histogram: Some(merged) }
    }

    /// Failed requests of every job.
    pub fn failures(&self) -> u64 {
        self.total.failures
    }
}

/// Writes `h` (nanoseconds) as HdrHistogram's text percentile distribution,
/// values in microseconds: the format HdrHistogram's `outputPercentileDistribution`
/// writes and its plotters read.
pub fn write_percentile_distribution(h: &Histogram<u64>, out: &mut impl Write) -> std::io::Result<()> {
    let digits = usize::from(h.sigfig());
    writeln!(out, "{:>12} {:>14} {:>10} {:>14}", "Value", "Percentile", "TotalCount", "1/(1-Percentile)")?;
    writeln!(out)?;
    let mut total = 0u64;
    for v in h.iter_quantiles(DISTRIBUTION_TICKS_PER_HALF_DISTANCE) {
        total += v.count_since_last_iteration();
        let value = us(v.value_iterated_to());
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            writeln!(out, "{value:>12.digits$} {q:>2.12} {total:>10} {:>14.2}", 1.0 / (1.0 - q))?;
        } else {
            writeln!(out, "{value:>12.digits$} {q:>2.12} {total:>10}")?;
        }
    }
    let (mean, stdev) = if h.is_empty() { (0.0, 0.0) } else { (h.mean() / NS_PER_US, h.stdev() / NS_PER_US) };
    writeln!(out, "#[Mean    = {mean:>12.digits$}, StdDeviation   = {stdev:>12.digits$}]")?;
    writeln!(out, "#[Max     = {:>12.digits$}, Total count    = {:>12}]", us(h.max()), h.len())?;
    writeln!(out, "#[Buckets = {:>12}, SubBuckets     = {:>12}]", h.buckets(), sub_buckets(h.sigfig()))
}

/// HdrHistogram's sub-bucket count for `sigfig` digits: the power of two
/// at or above 2·10^sigfig.
fn sub_buckets(sigfig: u8) -> u64 {
    (2 * 10u64.pow(u32::from(sigfig))).next_power_of_two()
}

/// The recorded buckets of `h` as `[value_ns, count]` pairs: a compact,
/// lossless (at the histogram's precision) form for JSON.
pub fn histogram_buckets(h: &Histogram<u64>) -> Vec<[u64; 2]> {
    h.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect()
}

/// Rebuilds a histogram from [`histogram_buckets`]' pairs.
pub fn histogram_from_buckets(buckets: &[[u64; 2]]) -> Histogram<u64> {
    let mut h = new_histogram();
    for &[value, count] in buckets {
        h.saturating_record_n(value, count);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = new_histogram();
        for i in 1..=10_000u64 {
            h.record(i * 100).unwrap();
        }
        h
    }

    #[test]
    fn distribution_text_has_hdrhistograms_shape() {
        let h = sample();
        let mut out = Vec::new();
        write_percentile_distribution(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "       Value     Percentile TotalCount 1/(1-Percentile)");
        assert_eq!(lines[1], "");
        let rows: Vec<Vec<&str>> =
            lines[2..].iter().take_while(|l| !l.starts_with('#')).map(|l| l.split_whitespace().collect()).collect();
        assert!(rows.len() > 20, "{text}");
        let mut last_pct = -1.0;
        let mut last_count = 0;
        for (i, r) in rows.iter().enumerate() {
            let last = i == rows.len() - 1;
            assert_eq!(r.len(), if last { 3 } else { 4 }, "row {i}: {r:?}");
            let value: f64 = r[0].parse().unwrap();
            let pct: f64 = r[1].parse().unwrap();
            let count: u64 = r[2].parse().unwrap();
            assert!(value > 0.0 && (0.0..=1.0).contains(&pct) && pct >= last_pct && count >= last_count);
            assert_eq!(r[0].split('.').nth(1).unwrap().len(), 3, "three decimals: {}", r[0]);
            if !last {
                let inv: f64 = r[3].parse().unwrap();
                assert!((inv - 1.0 / (1.0 - pct)).abs() / inv < 0.01, "{r:?}");
            }
            (last_pct, last_count) = (pct, count);
        }
        assert_eq!(last_pct, 1.0);
        assert_eq!(last_count, 10_000);
        // The first row is the lowest value (0.1 µs), the last the highest (1 ms).
        assert_eq!(rows[0][0], "0.100");
        assert_eq!(rows.last().unwrap()[0], "1000.447");
        let footer: Vec<&str> = lines.iter().copied().filter(|l| l.starts_with("#[")).collect();
        assert_eq!(footer.len(), 3);
        assert!(footer[0].starts_with("#[Mean    =      500.0") && footer[0].contains(", StdDeviation   ="));
        assert_eq!(footer[1], "#[Max     =     1000.447, Total count    =        10000]");
        assert!(footer[2].starts_with("#[Buckets =") && footer[2].ends_with("SubBuckets     =         2048]"));
    }

    #[test]
    fn empty_histogram_writes_header_and_footer() {
        let mut out = Vec::new();
        write_percentile_distribution(&new_histogram(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("       Value"));
        assert!(text.contains("Total count    =            0]"), "{text}");
    }

    #[test]
    fn buckets_round_trip() {
        let h = sample();
        let back = histogram_from_buckets(&histogram_buckets(&h));
        assert_eq!(back.len(), h.len());
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(back.value_at_quantile(q), h.value_at_quantile(q), "q {q}");
        }
    }

    #[test]
    fn totals_add_rates_and_merge_latency() {
        let outcome = |lat: u64, n: u64| {
            let mut h = new_histogram();
            h.record_n(lat, n).unwrap();
            JobOutcome {
                runtime: Duration::from_secs(2),
                ios: n,
                bytes: n * 4096,
                failures: 1,
                latency_sum_ns: lat * n,
                latency_min_ns: lat,
                latency_max_ns: lat,
                histogram: h,
                first_error: Some(bdev::IoError::Io),
                first_mismatch: None,
            }
        };
        let shape = |core| JobShape {
            core: Some(core),
            workload: Workload::RandRead,
            queue_depth: 8,
            io_size: 4096,
            offset: 0,
            size: 1 << 20,
        };
        let r = Report::build("n0", vec![(shape(0), outcome(1000, 100)), (shape(1), outcome(3000, 300))]);
        assert_eq!(r.jobs.len(), 2);
        assert_eq!(r.jobs[0].stats.iops, 50.0);
        // Percentiles are the bucket's highest value: within 0.1 % at three digits.
        let close = |a: f64, b: f64| (a - b).abs() <= b * 1e-3;
        assert!(close(r.jobs[1].stats.latency_us.p50, 3.0));
        assert_eq!(r.jobs[0].first_error.as_deref(), Some("Input/output error"));
        let t = &r.total;
        assert_eq!((t.ios, t.failures, t.iops, t.fail_s, t.runtime_s), (400, 2, 200.0, 1.0, 2.0));
        assert_eq!(t.mib_s, 400.0 * 4096.0 / 2.0 / (1 << 20) as f64);
        assert_eq!((t.latency_us.min, t.latency_us.max, t.latency_us.avg), (1.0, 3.0, 2.5));
        assert!(close(t.latency_us.p50, 3.0) && close(r.jobs[0].stats.latency_us.p99, 1.0));
        assert_eq!(r.histogram.as_ref().unwrap().len(), 400);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["jobs"][1]["iops"], 150.0);
        assert!(close(json["total"]["latency_us"]["p99_9"].as_f64().unwrap(), 3.0));
        assert!(json.get("histogram").is_none());
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back.jobs, r.jobs);
        assert_eq!(back.total, r.total);
    }
}
