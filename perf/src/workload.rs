//! The I/O patterns a job can run, named as bdevperf names them.

use serde::{Deserialize, Serialize};

/// What a job submits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Reads at random offsets.
    RandRead,
    /// Writes at random offsets.
    RandWrite,
    /// Sequential reads and writes, mixed by the read percentage.
    Rw,
    /// Random reads and writes, mixed by the read percentage.
    RandRw,
    /// Writes a pattern, reads it back and checks every byte.
    Verify,
    /// Write-zeroes requests (no data buffer).
    #[serde(rename = "write_zeroes")]
    WriteZeroes,
    /// Discard requests.
    Unmap,
    /// Flush requests.
    Flush,
}

impl Workload {
    /// Every workload, in the order the names are listed to people.
    pub const ALL: [Workload; 10] = [
        Workload::Read,
        Workload::Write,
        Workload::RandRead,
        Workload::RandWrite,
        Workload::Rw,
        Workload::RandRw,
        Workload::Verify,
        Workload::WriteZeroes,
        Workload::Unmap,
        Workload::Flush,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::RandRead => "randread",
            Workload::RandWrite => "randwrite",
            Workload::Rw => "rw",
            Workload::RandRw => "randrw",
            Workload::Verify => "verify",
            Workload::WriteZeroes => "write_zeroes",
            Workload::Unmap => "unmap",
            Workload::Flush => "flush",
        }
    }

    /// Offsets are drawn at random rather than walked in order. Verify is
    /// random too: it checks more of the device in a short run.
    pub fn is_random(self) -> bool {
        matches!(self, Workload::RandRead | Workload::RandWrite | Workload::RandRw | Workload::Verify)
    }

    /// The workload mixes reads and writes and needs a read percentage.
    pub fn needs_mix(self) -> bool {
        matches!(self, Workload::Rw | Workload::RandRw)
    }

    /// The workload changes the device's contents (needs a writable node).
    pub fn writes(self) -> bool {
        !matches!(self, Workload::Read | Workload::RandRead | Workload::Flush)
    }

    /// Requests carry a data buffer.
    pub fn has_data(self) -> bool {
        !matches!(self, Workload::WriteZeroes | Workload::Unmap | Workload::Flush)
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A workload name that is not one of [`Workload::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "workload '{0}' is not one of read, write, randread, randwrite, rw, randrw, verify, write_zeroes, unmap, flush"
)]
pub struct UnknownWorkload(pub String);

impl std::str::FromStr for Workload {
    type Err = UnknownWorkload;
    fn from_str(s: &str) -> Result<Workload, UnknownWorkload> {
        Workload::ALL.into_iter().find(|w| w.name() == s).ok_or_else(|| UnknownWorkload(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for w in Workload::ALL {
            assert_eq!(w.name().parse::<Workload>(), Ok(w));
            assert_eq!(serde_json::to_value(w).unwrap(), serde_json::json!(w.name()));
            assert_eq!(serde_json::from_value::<Workload>(serde_json::json!(w.name())).unwrap(), w);
        }
    }

    #[test]
    fn unknown_names_list_the_allowed_set() {
        let err = "randomread".parse::<Workload>().unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("'randomread'"), "{msg}");
        for w in Workload::ALL {
            assert!(msg.contains(w.name()), "{msg} lacks {w}");
        }
        assert!("".parse::<Workload>().is_err());
        assert!("READ".parse::<Workload>().is_err());
    }

    #[test]
    fn properties() {
        assert!(Workload::RandRw.needs_mix() && Workload::Rw.needs_mix());
        assert!(!Workload::RandRead.needs_mix());
        assert!(!Workload::Read.writes() && !Workload::Flush.writes());
        assert!(Workload::Verify.writes() && Workload::Unmap.writes());
        assert!(!Workload::Unmap.has_data() && Workload::Verify.has_data());
        assert!(Workload::Verify.is_random() && !Workload::Write.is_random());
    }
}
