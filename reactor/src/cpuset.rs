//! CPU lists: parsing `--cpumask` values and pinning threads.
//!
//! Accepted forms, as in SPDK: a hex mask (`0x3`, `3`), or a list of cores
//! and ranges with optional brackets (`[0,2-3]`, `0,2-3`).

use nix::sched::{CpuSet, sched_getaffinity, sched_setaffinity};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuSetError {
    #[error("cpumask '{0}' is not a hex mask (0x3) or a core list ([0,2-3])")]
    Syntax(String),
    #[error("cpumask '{0}' selects no core")]
    Empty(String),
    #[error("core {core} is not available to this process (allowed: {allowed:?})")]
    Unavailable { core: usize, allowed: Vec<usize> },
    #[error("reading the process CPU affinity failed: {0}")]
    Affinity(nix::Error),
}

/// Cores this process may run on, in ascending order.
pub fn allowed_cores() -> Result<Vec<usize>, CpuSetError> {
    let set = sched_getaffinity(Pid::from_raw(0)).map_err(CpuSetError::Affinity)?;
    Ok((0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect())
}

/// Parses a cpumask and checks every core against the allowed set.
pub fn parse_cpumask(text: &str) -> Result<Vec<usize>, CpuSetError> {
    let cores = parse_syntax(text)?;
    let allowed = allowed_cores()?;
    if let Some(&core) = cores.iter().find(|c| !allowed.contains(c)) {
        return Err(CpuSetError::Unavailable { core, allowed });
    }
    Ok(cores)
}

fn parse_syntax(text: &str) -> Result<Vec<usize>, CpuSetError> {
    let t = text.trim();
    let syntax = || CpuSetError::Syntax(text.to_string());
    let mut cores = Vec::new();
    let is_list = t.starts_with('[') || t.contains(',') || t.contains('-');
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")).or(if is_list { None } else { Some(t) }) {
        if hex.is_empty() || hex.len() > 32 {
            return Err(syntax());
        }
        let mask = u128::from_str_radix(hex, 16).map_err(|_| syntax())?;
        cores.extend((0..128).filter(|b| mask & (1u128 << b) != 0));
    } else {
        let inner = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')).unwrap_or(t);
        for part in inner.split(',') {
            let part = part.trim();
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let a: usize = a.parse().map_err(|_| syntax())?;
            let b: usize = b.parse().map_err(|_| syntax())?;
            if a > b || b >= CpuSet::count() {
                return Err(syntax());
            }
            cores.extend(a..=b);
        }
    }
    cores.sort_unstable();
    cores.dedup();
    if cores.is_empty() {
        return Err(CpuSetError::Empty(text.to_string()));
    }
    Ok(cores)
}

/// Pins the calling thread to one core.
pub fn pin_current_thread(core: usize) -> nix::Result<()> {
    let mut set = CpuSet::new();
    set.set(core)?;
    sched_setaffinity(Pid::from_raw(0), &set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_lists() {
        assert_eq!(parse_syntax("0x3").unwrap(), vec![0, 1]);
        assert_eq!(parse_syntax("5").unwrap(), vec![0, 2]);
        assert_eq!(parse_syntax("[0,2-3]").unwrap(), vec![0, 2, 3]);
        assert_eq!(parse_syntax("1-2,0").unwrap(), vec![0, 1, 2]);
        assert_eq!(parse_syntax("[1]").unwrap(), vec![1]);
    }

    #[test]
    fn bad_masks() {
        assert!(matches!(parse_syntax("0x0"), Err(CpuSetError::Empty(_))));
        assert!(matches!(parse_syntax("zz"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(parse_syntax("[3-1]"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(parse_syntax("[a]"), Err(CpuSetError::Syntax(_))));
        assert!(matches!(parse_syntax(""), Err(CpuSetError::Syntax(_))));
    }

    #[test]
    fn unavailable_core_is_named() {
        let err = parse_cpumask("[100000]").unwrap_err();
        assert!(matches!(err, CpuSetError::Syntax(_) | CpuSetError::Unavailable { .. }));
        let allowed = allowed_cores().unwrap();
        assert!(!allowed.is_empty());
        let first = allowed[0];
        assert_eq!(parse_cpumask(&format!("[{first}]")).unwrap(), vec![first]);
    }
}
