//! `file`: a regular file or block device, with QEMU's `file` driver options
//! (`filename`, `cache.direct`, `aio`, `locking`, `discard`, `read-only`).
//!
//! I/O goes through the io_uring of whichever reactor submits it
//! (`uring.rs`): a file can be used from every reactor at once. With
//! O_DIRECT the node's block size is the file system's direct-I/O alignment,
//! found by probing; the common layer bounces requests that are not aligned.

mod uring;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::unistd::{Whence, lseek};
use reactor::{IoBuf, SharedFd};

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::error::{BdevError, IoError};
use crate::graph::OpenCtx;
use crate::io::BlockStatus;
use crate::lock::{ImageLock, LockMode, Perms};
use crate::options::{DirectMode, OptReader};

/// Alignments tried, smallest first, when probing O_DIRECT.
const DIRECT_ALIGN_CANDIDATES: [u32; 4] = [512, 1024, 2048, 4096];

pub struct FileBdev {
    path: String,
    fd: SharedFd,
    size: u64,
    block_size: u32,
    direct: bool,
    read_only: bool,
    no_flush: bool,
    is_block_device: bool,
    /// The file is buffered on a file system with no non-blocking path
    /// (tmpfs): large reads and writes go to the offload threads, small
    /// reads straight to the kernel's worker pool (the kernel would punt
    /// them anyway — marked, they spread over several workers instead of
    /// queueing behind one).
    punt: bool,
    /// Cleared after the file system refused FALLOC_FL_ZERO_RANGE once.
    zero_range_ok: AtomicBool,
    /// The last data extent SEEK_DATA/SEEK_HOLE found, `[start, end)`:
    /// finding a hole scans the whole extent on some file systems (tmpfs),
    /// so a copy walking a large file asks once, not once per chunk.
    /// Writes only add data; discards and zeroing forget it.
    data_extent: std::sync::Mutex<Option<(u64, u64)>>,
    /// The file's entry among the open files, and its image locks.
    lock: ImageLock,
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let path = opts.str_req("filename")?;
    // io_uring is the only engine; QEMU's other values are accepted so
    // configurations written for QEMU carry over.
    opts.enum_opt("aio", &["io_uring", "threads", "native"])?;
    let _max_batch = opts.u64_opt("aio-max-batch")?;
    let locking = LockMode::parse(opts.enum_opt("locking", &["auto", "on", "off"])?.as_deref());
    let _drop_cache = opts.bool_opt("drop-cache")?;
    opts.finish()?;
    let common = ctx.common().clone();
    let (file, read_only) = open_file(&path, common.read_only, common.auto_read_only)?;
    let meta = file.metadata().map_err(|source| BdevError::Open { path: path.clone(), source })?;
    let is_block_device = meta.file_type().is_block_device();
    if !meta.is_file() && !is_block_device {
        return Err(BdevError::invalid(format!("'{path}' is not a regular file or block device")));
    }
    let size = if is_block_device {
        (&file).seek(SeekFrom::End(0)).map_err(|source| BdevError::Open { path: path.clone(), source })?
    } else {
        meta.len()
    };
    let tmpfs = !is_block_device && on_tmpfs(&file);
    let (file, direct, block_size) = choose_direct(&path, file, read_only, common.direct, tmpfs)?;
    // Holds nothing until a parent or user claims the node.
    let lock = ImageLock::register(&file, &path, ctx.node_name(), locking, ctx.lock_group())?;
    let fd: OwnedFd = file.into();
    Ok(Arc::new(FileBdev {
        path,
        fd: Arc::new(fd),
        size,
        block_size,
        direct,
        read_only,
        no_flush: common.no_flush,
        is_block_device,
        punt: tmpfs,
        zero_range_ok: AtomicBool::new(true),
        data_extent: std::sync::Mutex::new(None),
        lock,
    }))
}

/// True when the file lives on tmpfs (or another shared-memory file system).
fn on_tmpfs(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file).is_ok_and(|st| st.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

fn open_with(path: &str, write: bool, direct: bool) -> std::io::Result<File> {
    let mut flags = libc::O_CLOEXEC;
    if direct {
        flags |= libc::O_DIRECT;
    }
    OpenOptions::new().read(true).write(write).custom_flags(flags).open(path)
}

/// Opens read-write unless read-only was asked for; with `auto-read-only`,
/// falls back to read-only when the file is not writable (as QEMU does).
fn open_file(path: &str, read_only: bool, auto_read_only: bool) -> Result<(File, bool), BdevError> {
    let err = |source| BdevError::Open { path: path.to_string(), source };
    match open_with(path, !read_only, false) {
        Ok(f) => Ok((f, read_only)),
        Err(e)
            if auto_read_only
                && !read_only
                && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM)) =>
        {
            open_with(path, false, false).map(|f| (f, true)).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Reopens with O_DIRECT when wanted and possible; returns the file, whether
/// O_DIRECT is on, and the request alignment. A size that is not a multiple
/// of the alignment is fine: a read of the last block comes back short (the
/// rest reads as zeroes) and a write of it extends the file, as QEMU's
/// images expect.
fn choose_direct(
    path: &str,
    file: File,
    read_only: bool,
    mode: DirectMode,
    tmpfs: bool,
) -> Result<(File, bool, u32), BdevError> {
    // tmpfs accepts O_DIRECT, but its data lives in the page cache either
    // way: O_DIRECT only adds alignment rules and a slower kernel path.
    if mode == DirectMode::Off || (mode == DirectMode::Auto && tmpfs) {
        return Ok((file, false, 1));
    }
    let probe = open_with(path, !read_only, true).map_err(|e| e.raw_os_error());
    let direct = match probe {
        Ok(f) => probe_alignment(&f).map(|align| (f, align)),
        Err(_) => None,
    };
    match (direct, mode) {
        (Some((f, align)), _) => Ok((f, true, align)),
        (None, DirectMode::On) => {
            Err(BdevError::Unsupported(format!("'{path}' does not support O_DIRECT (cache.direct=on)")))
        }
        _ => Ok((file, false, 1)),
    }
}

/// The smallest alignment O_DIRECT reads accept on this file (QEMU probes
/// the same way); None when none works.
fn probe_alignment(file: &File) -> Option<u32> {
    let mut buf = IoBuf::new(4096);
    DIRECT_ALIGN_CANDIDATES.into_iter().find(|&align| {
        buf.set_len(align as usize);
        match file.read_at(&mut buf, 0) {
            Ok(_) => true,
            Err(e) => e.raw_os_error() != Some(libc::EINVAL),
        }
    })
}

impl FileBdev {
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Forgets the cached data extent if `[offset, offset + len)` touches
    /// it (a hole may be punched there).
    pub(crate) fn forget_extent(&self, offset: u64, len: u64) {
        let mut ext = self.data_extent.lock().unwrap_or_else(|e| e.into_inner());
        if ext.is_some_and(|(a, b)| offset < b && a < offset + len) {
            *ext = None;
        }
    }

    /// The answer the cached data extent gives for `offset`, if it covers it.
    fn cached_status(&self, offset: u64, len: u64) -> Option<BlockStatus> {
        let ext = *self.data_extent.lock().unwrap_or_else(|e| e.into_inner());
        ext.filter(|&(a, b)| a <= offset && offset < b)
            .map(|(_, b)| BlockStatus::data(b.min(offset + len) - offset, Some(offset)))
    }

    /// Data or hole at `offset`, by SEEK_DATA / SEEK_HOLE: system calls
    /// that walk the file's extents and may wait for the disk, so they run
    /// on an offload thread, never on a reactor.
    fn seek_status(&self, offset: u64, len: u64) -> Result<BlockStatus, IoError> {
        #[cfg(test)]
        tests::SEEKERS.lock().unwrap().push(std::thread::current().name().unwrap_or("").to_string());
        let fd = self.fd.as_fd();
        let end = offset + len;
        if let Some(st) = self.cached_status(offset, len) {
            return Ok(st);
        }
        let off = offset as libc::off_t;
        match lseek(fd, off, Whence::SeekData) {
            Ok(data) if data as u64 == offset => {
                let hole = lseek(fd, off, Whence::SeekHole).map(|h| h as u64).unwrap_or(end);
                if hole > offset {
                    *self.data_extent.lock().unwrap_or_else(|e| e.into_inner()) = Some((offset, hole));
                }
                Ok(BlockStatus::data(hole.min(end).max(offset + 1) - offset, Some(offset)))
            }
            Ok(data) => Ok(BlockStatus { offset: Some(offset), ..BlockStatus::zero((data as u64).min(end) - offset) }),
            // ENXIO: no data after offset, the rest is a hole.
            Err(nix::errno::Errno::ENXIO) => Ok(BlockStatus { offset: Some(offset), ..BlockStatus::zero(len) }),
            // No SEEK_DATA support (or a block device): everything is data.
            Err(_) => Ok(BlockStatus::data(len, Some(offset))),
        }
    }
}

impl Bdev for FileBdev {
    fn driver(&self) -> &'static str {
        "file"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        Ok(uring::FileChannel::new(self))
    }

    fn set_perms(&self, perms: Perms) -> Result<(), BdevError> {
        self.lock.set_perms(perms)
    }

    fn lock_group(&self) -> Option<u64> {
        Some(self.lock.group())
    }

    fn info(&self) -> BdevInfo {
        let actual_size = if self.is_block_device {
            None
        } else {
            nix::sys::stat::fstat(self.fd.as_fd()).ok().map(|st| st.st_blocks as u64 * 512)
        };
        BdevInfo {
            filename: self.path.clone(),
            direct: self.direct,
            no_flush: self.no_flush,
            actual_size,
            format_specific: Some(serde_json::json!({"type": "file", "data": {}})),
        }
    }
}

impl FileBdev {
    fn zero_range_supported(&self) -> bool {
        self.zero_range_ok.load(Ordering::Relaxed)
    }

    fn zero_range_unsupported(&self) {
        if self.zero_range_ok.swap(false, Ordering::Relaxed) {
            tracing::debug!(path = %self.path, "FALLOC_FL_ZERO_RANGE unsupported; writing zeroes instead");
        }
    }
}

impl std::fmt::Debug for FileBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileBdev")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("direct", &self.direct)
            .finish()
    }
}

pub(crate) fn seek_status_async(
    bdev: &Arc<FileBdev>,
    offset: u64,
    len: u64,
) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
    // A copy walking a large data extent asks once, then from memory.
    if let Some(st) = bdev.cached_status(offset, len) {
        return Box::pin(async move { Ok(st) });
    }
    let bdev = Arc::clone(bdev);
    let answer = reactor::offload::call(move || bdev.seek_status(offset, len));
    Box::pin(async move { answer.await.map_err(|_| IoError::Canceled)? })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use serde_json::json;

    use crate::Graph;

    /// Names of the threads that made SEEK_DATA/SEEK_HOLE calls.
    pub(super) static SEEKERS: Mutex<Vec<String>> = Mutex::new(Vec::new());

    #[test]
    fn block_status_seeks_off_the_reactor() {
        let cores = reactor::cpuset::allowed_cores().unwrap();
        let reactors = reactor::Reactors::start(&cores[..1], false, reactor::ReactorOptions::default()).unwrap();
        let mut graph = Graph::new(reactors.handles().to_vec());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[1u8; 65536], 1 << 20).unwrap();
        let node = graph.add(json!({"driver": "file", "node-name": "f", "filename": path})).unwrap();
        let n = std::sync::Arc::clone(&node);
        let (hole, data) = reactors.handles()[0]
            .run(move || async move {
                let ch = n.channel().unwrap();
                (ch.block_status(0, 8 << 20).await.unwrap(), ch.block_status(1 << 20, 4 << 20).await.unwrap())
            })
            .wait()
            .unwrap();
        assert!(hole.zero && !hole.data && hole.len == 1 << 20, "{hole:?}");
        assert!(data.data && data.len == 65536, "{data:?}");
        let seekers = SEEKERS.lock().unwrap().clone();
        assert!(!seekers.is_empty() && seekers.iter().all(|t| t.starts_with("offload-")), "{seekers:?}");
        drop(node);
        graph.close_all();
    }
}
