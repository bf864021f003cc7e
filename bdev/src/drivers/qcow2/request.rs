//! The request paths: read, write, write-zeroes, discard, flush and block
//! status.
//!
//! Requests whose clusters are already mapped in cached L2 tables — reads
//! of data clusters, overwrites of clusters with refcount one (COPIED) —
//! go straight to the file with their offset translated: only data I/O
//! (the fast path). Everything else runs as a task: planning under the
//! image's metadata lock, data I/O outside it.
//!
//! Either way a request that reaches host clusters through a mapping it
//! looked up holds a ticket of the current epoch until it completes, so
//! the allocator does not hand those clusters to anyone else meanwhile
//! (`reuse.rs`).

use std::rc::Rc;

use reactor::{IoBuf, LocalMutex};

use super::entry::{self, COPIED, Cluster, OFFSET_MASK, ZERO};
use super::state::Qcow2;
use crate::error::IoError;
use crate::io::{BlockStatus, Done, Io, IoDone, IoFlags, IoKind};

/// Most clusters allocated for one write at once.
const ALLOC_RUN_CLUSTERS_MAX: u64 = 512;

/// A request's claim on the host clusters it looked up, until it is done
/// with them: a cluster freed meanwhile is not handed out again before
/// (`reuse.rs`).
struct Ticket<'a> {
    q: &'a Qcow2,
    epoch: u64,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.q.epochs.borrow_mut().leave(self.epoch);
    }
}

/// A run of guest clusters being allocated: where, what they held before,
/// and the lock writers to the same clusters wait on.
pub(super) struct Run {
    pub table: u64,
    pub c0: u64,
    pub host: u64,
    pub old: Vec<Cluster>,
    _guard: reactor::LocalMutexGuard,
}

impl Qcow2 {
    /// A ticket of the current epoch, taken before looking up a mapping.
    fn ticket(&self) -> Ticket<'_> {
        Ticket { q: self, epoch: self.epochs.borrow_mut().enter() }
    }

    /// Host offset for a request whose clusters are all cached, allocated
    /// data, contiguous on the host (and, for writes, refcount one).
    fn fast_target(&self, io: &Io, write: bool) -> Option<u64> {
        let g = &self.geo;
        let (first, last) = (g.cluster(io.offset), g.cluster(io.end() - 1));
        let mut base = None;
        for c in first..=last {
            match self.cached_cluster(c)? {
                Ok(Cluster::Data { host, copied }) if copied || !write => {
                    let expect = *base.get_or_insert(host) + (c - first) * g.cluster_size;
                    if host != expect {
                        return None;
                    }
                }
                _ => return None,
            }
        }
        base.map(|h| h + g.within(io.offset))
    }

    pub(super) fn submit(self: &Rc<Self>, io: Io, done: Done) {
        let fast = match io.kind {
            IoKind::Read => self.fast_target(&io, false),
            IoKind::Write
                if !self.read_only
                    && !io.flags.contains(IoFlags::FUA)
                    && !io.flags.contains(IoFlags::FILL_UNALLOCATED)
                    && !io.flags.contains(IoFlags::COMPRESS) =>
            {
                // A write that would hit metadata takes the slow path,
                // which refuses it and raises the alarm.
                self.fast_target(&io, true).filter(|&h| self.check_write(h, io.len, 0).is_ok())
            }
            _ => None,
        };
        if let Some(host) = fast {
            let epoch = self.epochs.borrow_mut().enter();
            let tag = self.fast.borrow_mut().insert((done, io.offset, epoch)) as u64;
            let me: Rc<dyn IoDone> = Rc::clone(self) as Rc<dyn IoDone>;
            let mut io = io;
            io.offset = host;
            return self.file.raw().submit(io, Done::new(me, tag));
        }
        let this = Rc::clone(self);
        reactor::spawn_local(async move {
            let (io, res) = match io.kind {
                IoKind::Read => this.read(io).await,
                IoKind::Write => this.write(io).await,
                IoKind::Flush => {
                    let res = this.flush().await;
                    (io, res)
                }
                IoKind::Discard | IoKind::WriteZeroes => this.zero_or_discard(io).await,
            };
            done.complete(io, res);
        });
    }

    async fn read(self: Rc<Self>, mut io: Io) -> (Io, Result<(), IoError>) {
        let offset = io.offset;
        let res = self.read_into(offset, io.buf_mut()).await;
        (io, res)
    }

    /// Reads guest bytes at `offset` into `out`.
    async fn read_into(self: &Rc<Self>, offset: u64, out: &mut [u8]) -> Result<(), IoError> {
        let _ticket = self.ticket();
        let g = self.geo;
        let end = offset + out.len() as u64;
        // Plan under the lock, then move data without it.
        let mut plan: Vec<(u64, u64, Cluster)> = Vec::new();
        {
            let _lock = self.lock.lock().await;
            let mut pos = offset;
            while pos < end {
                let n = (g.cluster_size - g.within(pos)).min(end - pos);
                let cl = self.cluster(g.cluster(pos)).await?;
                match (plan.last_mut(), cl) {
                    // Merge data contiguous on the host into one read.
                    (Some((p, len, Cluster::Data { host, .. })), Cluster::Data { host: h2, .. })
                        if *host + g.within(*p) + *len == h2 + g.within(pos) =>
                    {
                        *len += n
                    }
                    (Some((_, len, Cluster::Unallocated)), Cluster::Unallocated) => *len += n,
                    _ => plan.push((pos, n, cl)),
                }
                pos += n;
            }
        }
        let mut jobs = Vec::new();
        for (pos, n, cl) in plan {
            let at = (pos - offset) as usize;
            let this = Rc::clone(self);
            match cl {
                Cluster::Zero { .. } => out[at..at + n as usize].fill(0),
                Cluster::Unallocated if !self.has_backing() => out[at..at + n as usize].fill(0),
                _ => jobs.push((at, reactor::spawn_local(async move { this.read_segment(pos, n, cl).await }))),
            }
        }
        let mut first_err = None;
        for (at, job) in jobs {
            match job.await {
                Ok(buf) => out[at..at + buf.len()].copy_from_slice(&buf),
                Err(e) => first_err = first_err.or(Some(e)),
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Reads one planned segment: data, compressed, or the backing chain.
    async fn read_segment(&self, pos: u64, n: u64, cl: Cluster) -> Result<IoBuf, IoError> {
        match cl {
            Cluster::Data { host, .. } => self.file.read(host + self.geo.within(pos), n as usize).await,
            Cluster::Compressed { offset, len } => {
                let cluster = self.read_compressed(offset, len).await?;
                let at = self.geo.within(pos) as usize;
                Ok(IoBuf::from_slice(&cluster[at..at + n as usize]))
            }
            Cluster::Unallocated => self.read_backing(pos, n).await,
            Cluster::Zero { .. } => Ok(IoBuf::zeroed(n as usize)),
        }
    }

    async fn read_compressed(&self, offset: u64, len: u64) -> Result<Vec<u8>, IoError> {
        let input = self.file.read(offset, len as usize).await?;
        let mut out = vec![0u8; self.geo.cluster_size as usize];
        entry::decompress(self.geo.compression, &input, &mut out).map_err(|e| {
            tracing::error!("qcow2: compressed cluster at {offset:#x}: {}", e.0);
            IoError::Io
        })?;
        Ok(out)
    }

    /// Guest bytes from the backing chain (zeroes past its end).
    async fn read_backing(&self, pos: u64, n: u64) -> Result<IoBuf, IoError> {
        let Some(b) = self.backing() else { return Ok(IoBuf::zeroed(n as usize)) };
        if pos >= b.size {
            return Ok(IoBuf::zeroed(n as usize));
        }
        let avail = n.min(b.size - pos);
        let mut got = b.ch.read(pos, avail as usize).await?;
        if avail < n {
            let mut buf = IoBuf::zeroed(n as usize);
            buf[..avail as usize].copy_from_slice(&got);
            got = buf;
        }
        Ok(got)
    }

    /// Fills `out` with the current content of guest cluster `c` from byte
    /// `from` (copy-on-write source).
    async fn cow_fill(&self, old: Cluster, c: u64, from: u64, out: &mut [u8]) -> Result<(), IoError> {
        let n = out.len() as u64;
        match old {
            Cluster::Zero { .. } => out.fill(0),
            Cluster::Unallocated if !self.has_backing() => out.fill(0),
            _ => out.copy_from_slice(&self.read_segment((c << self.geo.cluster_bits) + from, n, old).await?),
        }
        Ok(())
    }

    async fn write(self: Rc<Self>, mut io: Io) -> (Io, Result<(), IoError>) {
        if self.read_only {
            return (io, Err(IoError::ReadOnly));
        }
        if io.flags.contains(IoFlags::COMPRESS) {
            let data = io.buf.take().expect("write carries a buffer");
            let mut res = self.write_compressed(io.offset, &data).await;
            io.buf = Some(data);
            if res.is_ok() && io.flags.contains(IoFlags::FUA) {
                res = self.flush().await;
            }
            return (io, res);
        }
        let fill = io.flags.contains(IoFlags::FILL_UNALLOCATED);
        let whole = if fill { Ok(false) } else { self.write_whole_clusters(&mut io).await };
        let mut res = match whole {
            Ok(true) => Ok(()),
            Ok(false) => {
                let data = io.buf.take().expect("write carries a buffer");
                let r = self.write_range(io.offset, &data, fill).await;
                io.buf = Some(data);
                r
            }
            Err(e) => Err(e),
        };
        if res.is_ok() && io.flags.contains(IoFlags::FUA) {
            res = self.flush().await;
        }
        (io, res)
    }

    /// A write of whole clusters that all need allocation, inside one L2
    /// table: the request's own buffer goes to the new clusters, no copy.
    /// Ok(false) when the request does not qualify.
    async fn write_whole_clusters(&self, io: &mut Io) -> Result<bool, IoError> {
        let g = self.geo;
        if g.within(io.offset) != 0 || g.within(io.len) != 0 {
            return Ok(false);
        }
        let (c0, n) = (g.cluster(io.offset), io.len >> g.cluster_bits);
        if n > ALLOC_RUN_CLUSTERS_MAX || c0 / g.l2_entries != (c0 + n - 1) / g.l2_entries {
            return Ok(false);
        }
        let guard = self.lock.lock().await;
        let mut old = Vec::with_capacity(n as usize);
        for c in c0..c0 + n {
            if self.allocating.borrow().contains_key(&c) {
                return Ok(false);
            }
            let cl = self.cluster(c).await?;
            if matches!(cl, Cluster::Data { copied: true, .. }) {
                return Ok(false);
            }
            old.push(cl);
        }
        let table = self.writable_l2(c0).await?;
        let host = self.alloc_clusters(n).await?;
        let run = self.register_run(table, c0, host, old);
        drop(guard);
        let buf = io.buf.take().expect("write carries a buffer");
        let res = match self.check_write(host, buf.len() as u64, 0) {
            Ok(()) => {
                let (io_back, res) = self.file.submit_io(Io::write(host, buf, IoFlags::NONE)).await;
                io.buf = io_back.buf;
                res
            }
            Err(e) => {
                io.buf = Some(buf);
                Err(e)
            }
        };
        self.commit_run(run, res).await?;
        Ok(true)
    }

    /// Marks guest clusters `c0..c0 + old.len()` as being allocated at `host`.
    pub(super) fn register_run(&self, table: u64, c0: u64, host: u64, old: Vec<Cluster>) -> Run {
        let lock = LocalMutex::new();
        let guard = lock.try_lock().expect("a fresh lock is free");
        let mut alloc = self.allocating.borrow_mut();
        for c in c0..c0 + old.len() as u64 {
            alloc.insert(c, lock.clone());
        }
        Run { table, c0, host, old, _guard: guard }
    }

    /// Points the L2 entries of a written run at their new clusters (or, if
    /// the data write failed, gives the clusters back), then releases the run.
    async fn commit_run(&self, run: Run, written: Result<(), IoError>) -> Result<(), IoError> {
        let _g = self.lock.lock().await;
        let n = run.old.len() as u64;
        for c in run.c0..run.c0 + n {
            self.allocating.borrow_mut().remove(&c);
        }
        let cs = self.geo.cluster_size;
        match written {
            Ok(()) => {
                self.load_l2(run.table).await?;
                let base = (run.c0 % self.geo.l2_entries) as usize;
                {
                    let mut l2 = self.l2.borrow_mut();
                    let t = l2.get_mut(run.table).expect("table just loaded");
                    for i in 0..n as usize {
                        t[base + i] = entry::data_entry(run.host + i as u64 * cs);
                    }
                }
                for &cl in &run.old {
                    self.queue_free(cl);
                }
                Ok(())
            }
            Err(e) => {
                // Never referenced: the clusters can go back at once.
                for k in 0..n {
                    self.update_refcount((run.host >> self.geo.cluster_bits) + k, -1).await?;
                }
                Err(e)
            }
        }
        // Dropping `run` releases writers waiting on these clusters.
    }

    /// The general write: in-place where clusters are ours, allocation with
    /// copy-on-write elsewhere.
    /// With `fill`, clusters this layer already holds are skipped (see
    /// [`IoFlags::FILL_UNALLOCATED`]).
    pub(super) async fn write_range(&self, offset: u64, data: &[u8], fill: bool) -> Result<(), IoError> {
        let end = offset + data.len() as u64;
        let mut pos = offset;
        while pos < end {
            pos += self.write_step(pos, offset, data, fill).await?;
        }
        Ok(())
    }

    /// Writes from `pos` as far as one run of clusters allows; returns the
    /// bytes written or skipped (0: waited for a concurrent allocation, retry).
    async fn write_step(&self, pos: u64, base: u64, data: &[u8], fill: bool) -> Result<u64, IoError> {
        // The clusters looked up below are written (in place) or read
        // (copy-on-write) after the lock is dropped.
        let _ticket = self.ticket();
        let g = self.geo;
        let end = base + data.len() as u64;
        let c0 = g.cluster(pos);
        let guard = self.lock.lock().await;
        let busy = self.allocating.borrow().get(&c0).cloned();
        if let Some(run) = busy {
            drop(guard);
            drop(run.lock().await);
            return Ok(0);
        }
        let table = self.writable_l2(c0).await?;
        let table_last = (c0 / g.l2_entries + 1) * g.l2_entries - 1;
        let last = g.cluster(end - 1).min(table_last).min(c0 + ALLOC_RUN_CLUSTERS_MAX - 1);
        let first = self.cluster(c0).await?;
        if fill && first != Cluster::Unallocated {
            // Held here already (written meanwhile): keep it.
            return Ok(end.min((c0 + 1) << g.cluster_bits) - pos);
        }
        if let Cluster::Data { host, copied: true } = first {
            // In place over contiguous clusters that are ours.
            let mut c = c0 + 1;
            while c <= last
                && !self.allocating.borrow().contains_key(&c)
                && self.cluster(c).await? == (Cluster::Data { host: host + (c - c0) * g.cluster_size, copied: true })
            {
                c += 1;
            }
            drop(guard);
            let run_end = end.min(c << g.cluster_bits);
            let buf = IoBuf::from_slice(&data[(pos - base) as usize..(run_end - base) as usize]);
            self.write_checked(host + g.within(pos), buf, 0).await?;
            return Ok(run_end - pos);
        }
        let mut old = vec![first];
        let mut c = c0 + 1;
        while c <= last && !self.allocating.borrow().contains_key(&c) {
            let cl = self.cluster(c).await?;
            if matches!(cl, Cluster::Data { copied: true, .. }) || (fill && cl != Cluster::Unallocated) {
                break;
            }
            old.push(cl);
            c += 1;
        }
        // Fewer clusters than asked where only a shorter free run is left:
        // the next step writes the rest.
        let (host, n) = self.alloc_clusters_upto(old.len() as u64).await?;
        old.truncate(n as usize);
        let run = self.register_run(table, c0, host, old);
        drop(guard);
        let run_start = c0 << g.cluster_bits;
        let run_end = (c0 + n) << g.cluster_bits;
        let w_end = end.min(run_end);
        let filled = async {
            let mut buf = IoBuf::new((run_end - run_start) as usize);
            if pos > run_start {
                self.cow_fill(run.old[0], c0, 0, &mut buf[..(pos - run_start) as usize]).await?;
            }
            if w_end < run_end {
                let lc = c0 + n - 1;
                let from = w_end - (lc << g.cluster_bits);
                let at = (w_end - run_start) as usize;
                self.cow_fill(run.old[n as usize - 1], lc, from, &mut buf[at..]).await?;
            }
            buf[(pos - run_start) as usize..(w_end - run_start) as usize]
                .copy_from_slice(&data[(pos - base) as usize..(w_end - base) as usize]);
            self.write_checked(host, buf, 0).await
        }
        .await;
        self.commit_run(run, filled).await?;
        Ok(w_end - pos)
    }

    async fn zero_or_discard(self: Rc<Self>, io: Io) -> (Io, Result<(), IoError>) {
        if self.read_only {
            return (io, Err(IoError::ReadOnly));
        }
        let mut res = self.zero_or_discard_range(&io).await;
        if res.is_ok() && io.flags.contains(IoFlags::FUA) {
            res = self.flush().await;
        }
        (io, res)
    }

    async fn zero_or_discard_range(&self, io: &Io) -> Result<(), IoError> {
        let g = self.geo;
        let discard = io.kind == IoKind::Discard;
        let (start, end) = (io.offset, io.end());
        let a = start.next_multiple_of(g.cluster_size).min(end);
        let b = (end >> g.cluster_bits << g.cluster_bits).max(a);
        if !discard {
            // Partial clusters at the edges get zero data.
            if start < a {
                self.write_range(start, &vec![0u8; (a - start) as usize], false).await?;
            }
            if b < end {
                self.write_range(b, &vec![0u8; (end - b) as usize], false).await?;
            }
        }
        let unmap = discard || io.flags.contains(IoFlags::MAY_UNMAP);
        let mut c = g.cluster(a);
        while c < g.cluster(b) {
            c += self.zero_cluster(c, discard, unmap).await?;
        }
        Ok(())
    }

    /// Zeroes or discards whole cluster `c`; returns clusters done (0: retry).
    async fn zero_cluster(&self, c: u64, discard: bool, unmap: bool) -> Result<u64, IoError> {
        let g = self.geo;
        let guard = self.lock.lock().await;
        let busy = self.allocating.borrow().get(&c).cloned();
        if let Some(run) = busy {
            drop(guard);
            drop(run.lock().await);
            return Ok(0);
        }
        self.l1_lookup(c)?;
        let old = self.cluster(c).await?;
        let has_backing = self.has_backing();
        let v3 = g.version >= 3;
        // QEMU's choices, so images end up mapped the same way.
        let new_entry = if discard {
            // Over a backing file (v3) even an unallocated cluster gets the
            // zero flag, so the backing data does not show through.
            if old == Cluster::Unallocated && !(has_backing && v3) {
                return Ok(1);
            }
            if v3 { ZERO } else { 0 }
        } else if v3 {
            match old {
                Cluster::Data { host, copied: true } | Cluster::Zero { host: Some(host), copied: true } if !unmap => {
                    host | COPIED | ZERO
                }
                _ => ZERO,
            }
        } else if !has_backing {
            // Version 2 has no zero flag; unallocated reads as zero.
            if old == Cluster::Unallocated {
                return Ok(1);
            }
            0
        } else {
            // Version 2 over a backing file: zeroes must be written as data.
            drop(guard);
            self.write_range(c << g.cluster_bits, &vec![0u8; g.cluster_size as usize], false).await?;
            return Ok(1);
        };
        let table = self.writable_l2(c).await?;
        let idx = (c % g.l2_entries) as usize;
        let current = self.l2.borrow_mut().get(table).expect("table loaded")[idx];
        if current != new_entry {
            self.l2.borrow_mut().get_mut(table).expect("table loaded")[idx] = new_entry;
            let keeps_host = new_entry & OFFSET_MASK != 0;
            if !keeps_host {
                self.queue_free(old);
            }
        }
        drop(guard);
        Ok(1)
    }

    /// What the range at `offset` holds, through the backing chain.
    pub(super) async fn block_status(self: Rc<Self>, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        let g = self.geo;
        let end = offset + len;
        let (first, run) = {
            let _lock = self.lock.lock().await;
            let c0 = g.cluster(offset);
            let first = self.cluster(c0).await?;
            // Whether cluster `c` continues the run `first` starts: the same
            // kind, and for data, the next host cluster.
            let continues = |c: u64, cl: Cluster| match (first, cl) {
                (Cluster::Data { host: a, .. }, Cluster::Data { host: b, .. }) => b == a + (c - c0) * g.cluster_size,
                (Cluster::Zero { host: None, .. }, Cluster::Zero { host: None, .. }) => true,
                (Cluster::Zero { host: Some(a), .. }, Cluster::Zero { host: Some(b), .. }) => {
                    b == a + (c - c0) * g.cluster_size
                }
                (Cluster::Unallocated, Cluster::Unallocated) => true,
                (Cluster::Compressed { .. }, Cluster::Compressed { .. }) => true,
                _ => false,
            };
            // One L2 table at a time: a range no table covers is skipped
            // whole, a loaded table is scanned without further lookups, so
            // a walk costs per table, not per cluster of virtual size.
            let mut pos = (c0 + 1) << g.cluster_bits;
            'scan: while pos < end {
                let c = g.cluster(pos);
                let table_end = (c / g.l2_entries + 1) * g.l2_entries;
                let (_, off, _) = self.l1_lookup(c)?;
                if off == 0 {
                    if !matches!(first, Cluster::Unallocated) {
                        break;
                    }
                    pos = table_end << g.cluster_bits;
                    continue;
                }
                self.load_l2(off).await?;
                let mut l2 = self.l2.borrow_mut();
                let table = l2.get(off).expect("table just loaded");
                for cc in c..table_end {
                    pos = cc << g.cluster_bits;
                    if pos >= end || !continues(cc, self.decode(table[(cc % g.l2_entries) as usize])?) {
                        break 'scan;
                    }
                }
                pos = table_end << g.cluster_bits;
            }
            (first, pos.min(end) - offset)
        };
        let within = g.within(offset);
        Ok(match first {
            Cluster::Data { host, .. } => BlockStatus::data(run, Some(host + within)),
            Cluster::Zero { host, .. } => BlockStatus { offset: host.map(|h| h + within), ..BlockStatus::zero(run) },
            Cluster::Compressed { .. } => BlockStatus { compressed: true, ..BlockStatus::data(run, None) },
            Cluster::Unallocated => match self.backing() {
                Some(b) if offset < b.size => {
                    let st = b.ch.block_status(offset, run.min(b.size - offset)).await?;
                    BlockStatus { depth: st.depth + 1, ..st }
                }
                // No backing, or past its end: zeroes that no layer holds
                // (qemu-img map reports this node's depth).
                _ => BlockStatus::unallocated(run),
            },
        })
    }
}

impl IoDone for Qcow2 {
    fn io_done(&self, tag: u64, mut io: Io, res: Result<(), IoError>) {
        let (done, offset, epoch) = self.fast.borrow_mut().remove(tag as usize);
        self.epochs.borrow_mut().leave(epoch);
        io.offset = offset;
        done.complete(io, res);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{
        KIB, MIB, Op, Rng, assert_consistent, caches, new_disk, open, pattern, read, run, write,
    };
    use super::*;

    #[test]
    fn requests_read_back_as_a_flat_model_across_reopens() {
        for (cluster, seed) in [(512u64, 11u64), (4 * KIB, 12), (64 * KIB, 13)] {
            let size = 2 * MIB;
            let disk = new_disk(size, cluster, 4);
            let d = disk.clone();
            run(async move {
                let mut flat = vec![0u8; size as usize];
                let mut r = Rng(seed);
                let mut o = open(&d, caches(4, 2)).await;
                for step in 0..150 {
                    let op = Op::random(&mut r, size, cluster, 3 * cluster / 512, step);
                    op.apply(&o.ch).await;
                    op.model(&mut flat, cluster);
                    let (at, len) = (r.below(size - 8192), 1 + r.below(8192));
                    let got = read(&o.ch, at, len as usize).await;
                    let want = &flat[at as usize..(at + len) as usize];
                    if got != want {
                        let first = (0..len as usize).find(|&i| got[i] != want[i]).unwrap();
                        panic!(
                            "cluster {cluster}, step {step} after {op:?}: read {at:#x}+{len:#x} differs from {:#x} on",
                            at + first as u64
                        );
                    }
                    if step % 50 == 49 {
                        o.q.flush().await.unwrap();
                        o = open(&d, caches(4, 2)).await;
                    }
                }
                o.q.flush().await.unwrap();
                assert!(read(&o.ch, 0, size as usize).await == flat, "cluster {cluster}: the whole disk");
            });
            assert_consistent(&disk.contents(), "after the workload");
        }
    }

    #[test]
    fn an_overwrite_of_a_cached_cluster_takes_the_fast_path() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            write(&o.ch, 0, &pattern(0, 8192, 1)).await;
            // With the metadata lock held, only the fast path can finish.
            let guard = o.q.lock.lock().await;
            write(&o.ch, 4096, &pattern(4096, 4096, 2)).await;
            assert_eq!(read(&o.ch, 0, 4096).await, pattern(0, 4096, 1));
            drop(guard);
            assert_eq!(read(&o.ch, 4096, 4096).await, pattern(4096, 4096, 2));
            // A write to an unallocated cluster cannot.
            let guard = o.q.lock.lock().await;
            let ch = o.ch.clone();
            let slow = reactor::spawn_local(async move { write(&ch, MIB, &pattern(MIB, 512, 3)).await });
            for _ in 0..10 {
                reactor::yield_now().await;
            }
            assert!(!slow.is_finished(), "an allocating write waits for the metadata lock");
            drop(guard);
            slow.await;
        });
    }

    #[test]
    fn zeroes_and_discards_map_clusters_as_qemu_does() {
        let disk = new_disk(4 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let cs = 64 * KIB;
            write(&o.ch, 0, &pattern(0, 4 * cs as usize, 1)).await;
            let host = |c: u64| {
                let q = Rc::clone(&o.q);
                async move {
                    let _g = q.lock.lock().await;
                    q.cluster(c).await.unwrap()
                }
            };
            let Cluster::Data { host: h1, .. } = host(1).await else { panic!("cluster 1 holds data") };
            o.ch.write_zeroes(cs, cs, IoFlags::NONE).await.unwrap();
            assert_eq!(host(1).await, Cluster::Zero { host: Some(h1), copied: true }, "zeroing keeps the cluster");
            o.ch.write_zeroes(2 * cs, cs, IoFlags::MAY_UNMAP).await.unwrap();
            assert_eq!(host(2).await, Cluster::Zero { host: None, copied: false }, "MAY_UNMAP drops it");
            o.ch.discard(3 * cs, cs).await.unwrap();
            assert_eq!(host(3).await, Cluster::Zero { host: None, copied: false });
            o.ch.discard(10 * cs, cs).await.unwrap();
            assert_eq!(host(10).await, Cluster::Unallocated, "nothing to discard, nothing changes");
            // A partial cluster is written as zeroes.
            o.ch.write_zeroes(512, 512, IoFlags::MAY_UNMAP).await.unwrap();
            assert!(matches!(host(0).await, Cluster::Data { .. }));
            assert_eq!(read(&o.ch, 0, 1536).await[512..1024], [0u8; 512]);
            assert_eq!(read(&o.ch, cs, 3 * cs as usize).await, vec![0u8; 3 * cs as usize]);
        });
    }

    #[test]
    fn block_status_reports_runs_of_one_kind() {
        let disk = new_disk(8 * MIB, 64 * KIB, 4);
        run(async move {
            let o = open(&disk, caches(8, 4)).await;
            let cs = 64 * KIB;
            write(&o.ch, 0, &pattern(0, 2 * cs as usize, 1)).await;
            o.ch.write_zeroes(2 * cs, 2 * cs, IoFlags::MAY_UNMAP).await.unwrap();
            let st = Rc::clone(&o.q).block_status(0, 8 * MIB).await.unwrap();
            assert!(st.data && st.allocated && st.len == 2 * cs, "{st:?}");
            assert!(st.offset.is_some());
            let st = Rc::clone(&o.q).block_status(2 * cs, 8 * MIB - 2 * cs).await.unwrap();
            assert!(st.zero && st.allocated && !st.data && st.len == 2 * cs, "{st:?}");
            let st = Rc::clone(&o.q).block_status(4 * cs, 8 * MIB - 4 * cs).await.unwrap();
            assert_eq!(st, BlockStatus::unallocated(8 * MIB - 4 * cs), "the rest, one step");
        });
    }
}
