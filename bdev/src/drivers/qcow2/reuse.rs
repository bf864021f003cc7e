//! When a freed host cluster may be handed out again.
//!
//! A cluster whose refcount drops to zero is not free at once: a request
//! that looked up the old mapping may still be on its way to it — a
//! fast-path overwrite issued without the metadata lock, a read, an
//! in-place write planned under the lock and sent after it. If the
//! allocator gave the cluster to another guest cluster and new data
//! landed there, the late request would overwrite it (or read it).
//!
//! ```text
//!   refcount -> 0 ──▶ limbo ──(write-back's last flush done)──▶ quarantine(tag = epoch E)
//!                                                                 │
//!   every request touching host clusters holds a ticket of the    │ no ticket of an
//!   epoch current when it looked up the mapping                   ▼ epoch <= E left
//!                                                                free ──▶ allocator
//! ```
//!
//! So a cluster is reused only once its lowered refcount is durable (it
//! left limbo at the end of a write-back) and every request that could
//! still target it (tickets of epochs up to its tag) has completed. The
//! epoch advances each time clusters enter quarantine; requests started
//! later cannot see the old mapping.
//!
//! Besides clusters freed while open, `free` collects holes left by
//! earlier sessions, found by a scan of the refcount blocks below the
//! allocation frontier that advances a bounded step per allocation (see
//! `alloc.rs`).

use std::collections::{BTreeMap, HashSet, VecDeque};

/// Requests in flight per epoch.
#[derive(Debug)]
pub(super) struct Epochs {
    current: u64,
    /// Epoch of `counts[0]`; epochs before it have nothing in flight.
    base: u64,
    /// In-flight requests of epochs `base..=current`; `counts[0]` is
    /// non-zero unless `base == current`.
    counts: VecDeque<u64>,
}

impl Default for Epochs {
    fn default() -> Epochs {
        Epochs { current: 0, base: 0, counts: VecDeque::from([0]) }
    }
}

impl Epochs {
    /// A request starts: it holds a ticket of the current epoch.
    pub fn enter(&mut self) -> u64 {
        let i = (self.current - self.base) as usize;
        self.counts[i] += 1;
        self.current
    }

    /// The request holding a ticket of `epoch` completed.
    pub fn leave(&mut self, epoch: u64) {
        let i = (epoch - self.base) as usize;
        debug_assert!(self.counts[i] > 0, "epoch {epoch} has nothing in flight");
        self.counts[i] -= 1;
        while self.base < self.current && self.counts[0] == 0 {
            self.counts.pop_front();
            self.base += 1;
        }
    }

    /// Closes the current epoch (clusters freed up to now carry its
    /// number); returns it.
    pub fn advance(&mut self) -> u64 {
        let closed = self.current;
        self.current += 1;
        self.counts.push_back(0);
        if self.counts[0] == 0 {
            self.counts.pop_front();
            self.base += 1;
        }
        closed
    }

    /// Whether a request of `epoch` or earlier is still in flight.
    pub fn busy_upto(&self, epoch: u64) -> bool {
        self.base <= epoch && self.counts[0] > 0
    }

    /// Requests in flight.
    #[cfg(test)]
    pub fn in_flight(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Free host clusters as runs: start -> length.
#[derive(Debug, Default)]
pub(super) struct FreeRuns {
    runs: BTreeMap<u64, u64>,
    clusters: u64,
}

impl FreeRuns {
    pub fn contains(&self, c: u64) -> bool {
        self.runs.range(..=c).next_back().is_some_and(|(&s, &n)| c < s + n)
    }

    /// Adds cluster `c` (nothing if it is there already).
    pub fn insert(&mut self, c: u64) {
        if self.contains(c) {
            return;
        }
        self.clusters += 1;
        let (mut start, mut len) = (c, 1);
        if let Some((&s, &n)) = self.runs.range(..c).next_back()
            && s + n == c
        {
            self.runs.remove(&s);
            (start, len) = (s, n + 1);
        }
        if let Some(n) = self.runs.remove(&(c + 1)) {
            len += n;
        }
        self.runs.insert(start, len);
    }

    /// Takes `n` contiguous clusters from the lowest run long enough.
    pub fn take(&mut self, n: u64) -> Option<u64> {
        let (&s, &len) = self.runs.iter().find(|&(_, &len)| len >= n)?;
        self.runs.remove(&s);
        if len > n {
            self.runs.insert(s + n, len - n);
        }
        self.clusters -= n;
        Some(s)
    }

    /// Takes `n` contiguous clusters from the lowest run long enough, or,
    /// if none is, as many as the lowest run holds. Returns the first and
    /// how many.
    pub fn take_upto(&mut self, n: u64) -> Option<(u64, u64)> {
        if let Some(s) = self.take(n) {
            return Some((s, n));
        }
        let (&s, &len) = self.runs.iter().next()?;
        debug_assert!(len < n);
        self.runs.remove(&s);
        self.clusters -= len;
        Some((s, len))
    }

    /// Clusters held.
    #[cfg(test)]
    pub fn clusters(&self) -> u64 {
        self.clusters
    }
}

/// Freed clusters on their way back to the allocator.
#[derive(Debug, Default)]
pub(super) struct Reuse {
    /// Refcount lowered to zero; not yet durable.
    limbo: Vec<u64>,
    /// Durable, waiting for the requests of epochs up to their tag.
    quarantine: VecDeque<(u64, u64)>,
    /// Every cluster in `limbo` or `quarantine` (the hole scan skips them).
    held: HashSet<u64>,
    pub free: FreeRuns,
}

impl Reuse {
    /// Cluster `c`'s refcount dropped to zero.
    pub fn freed(&mut self, c: u64) {
        if self.held.insert(c) {
            self.limbo.push(c);
        }
    }

    /// The clusters freed and not reusable yet.
    pub fn held_clusters(&self) -> HashSet<u64> {
        self.held.clone()
    }

    /// Whether `c` was freed and is not reusable yet.
    pub fn is_held(&self, c: u64) -> bool {
        self.held.contains(&c)
    }

    /// Clusters in limbo now: a write-back's last flush makes the first
    /// this many durable.
    pub fn limbo_len(&self) -> usize {
        self.limbo.len()
    }

    /// The first `n` clusters of limbo are durable; they wait for the
    /// requests of epochs up to `tag`.
    pub fn durable(&mut self, n: usize, tag: u64) {
        let n = n.min(self.limbo.len());
        self.quarantine.extend(self.limbo.drain(..n).map(|c| (tag, c)));
    }

    /// Moves what no request in flight can still reach to `free`.
    pub fn release(&mut self, epochs: &Epochs) {
        while let Some(&(tag, c)) = self.quarantine.front() {
            if epochs.busy_upto(tag) {
                break;
            }
            self.quarantine.pop_front();
            self.held.remove(&c);
            self.free.insert(c);
        }
    }

    /// Clusters freed and not reusable yet.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.held.len()
    }

    /// Forgets everything (the refcounts were rebuilt).
    pub fn clear(&mut self) {
        *self = Reuse::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_stays_busy_until_its_last_request_and_those_before_it_complete() {
        let mut e = Epochs::default();
        assert!(!e.busy_upto(0));
        let a = e.enter();
        let tag0 = e.advance();
        assert_eq!((a, tag0), (0, 0));
        let b = e.enter();
        assert_eq!(b, 1);
        let tag1 = e.advance();
        assert!(e.busy_upto(tag0) && e.busy_upto(tag1));
        e.leave(b);
        assert!(e.busy_upto(tag0), "an older request is still out");
        assert!(e.busy_upto(tag1), "and clusters freed later wait for it too");
        e.leave(a);
        assert!(!e.busy_upto(tag1));
        assert_eq!(e.in_flight(), 0);
        let c = e.enter();
        assert!(!e.busy_upto(tag1), "a request that started later cannot hold back older clusters");
        assert!(e.busy_upto(c));
        e.leave(c);
        for _ in 0..1000 {
            e.advance();
        }
        assert!(e.counts.len() <= 2, "idle epochs are not kept");
    }

    #[test]
    fn free_runs_merge_and_hand_out_the_lowest_that_fits() {
        let mut f = FreeRuns::default();
        for c in [10, 12, 11, 20, 21, 5] {
            f.insert(c);
        }
        f.insert(11);
        assert_eq!(f.clusters(), 6);
        assert!(f.contains(12) && !f.contains(13) && f.contains(5));
        assert_eq!(f.take(2), Some(10), "10..13 is the lowest run of two");
        assert_eq!(f.take(3), None);
        assert_eq!(f.take(1), Some(5));
        assert_eq!(f.take(2), Some(20));
        assert_eq!(f.take(1), Some(12));
        assert_eq!(f.clusters(), 0);
        for c in 30..33 {
            f.insert(c);
        }
        assert_eq!(f.take(3), Some(30));
        for c in [40, 41, 50, 51, 52] {
            f.insert(c);
        }
        assert_eq!(f.take_upto(3), Some((50, 3)), "a run long enough first");
        assert_eq!(f.take_upto(3), Some((40, 2)), "then the lowest, shorter");
        assert_eq!(f.take_upto(3), None);
    }

    #[test]
    fn a_freed_cluster_is_reusable_only_when_durable_and_unreachable() {
        let (mut r, mut e) = (Reuse::default(), Epochs::default());
        let late = e.enter();
        r.freed(7);
        r.freed(7);
        assert!(r.is_held(7));
        r.release(&e);
        assert_eq!(r.free.clusters(), 0, "not durable yet");
        let n = r.limbo_len();
        r.freed(8);
        let tag = e.advance();
        r.durable(n, tag);
        r.release(&e);
        assert_eq!(r.free.clusters(), 0, "a request of its epoch is in flight");
        e.leave(late);
        r.release(&e);
        assert!(r.free.contains(7) && !r.is_held(7));
        assert!(!r.free.contains(8) && r.is_held(8), "8 was freed after the flush began");
        assert_eq!(r.waiting(), 1);
    }
}
