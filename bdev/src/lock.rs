//! Permissions and image locks: who may read and write a node, and the
//! byte-range locks that tell other processes (QEMU, qemu-img, another
//! Spindle) that an image file is in use.
//!
//! Every claim on a node carries [`Perms`]: what its holder does (`perm`)
//! and what it lets others do (`shared`), with QEMU's four permission bits.
//! Two claims conflict when one needs a bit the other does not share; the
//! node refuses the later claim.
//!
//! A file node turns the union of its claims into QEMU's locks, so the two
//! programs see each other:
//!
//! ```text
//!   byte 100 + bit   read lock: "I hold this permission"
//!   byte 200 + bit   read lock: "I do not share this permission"
//!   bits: 0 consistent read, 1 write, 2 write unchanged, 3 resize
//! ```
//!
//! The locks are open-file-description (OFD) locks, which conflict between
//! two opens of one file even inside one process. Spindle keeps one lock
//! descriptor per file (device and inode) holding the union of its nodes'
//! locks, and checks its own nodes against each other in a registry, so
//! the checks are the same for a node of this process and for QEMU's, and
//! a writable twin of a read-only image (commit) can be told apart from a
//! second, independent open. The registry also knows every file a node
//! has open, whatever its `locking` setting, so nothing creates or
//! truncates a file that is in use ([`CreateLock`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use nix::fcntl::{FcntlArg, fcntl};

use crate::error::BdevError;

/// QEMU's permission bits (`BlockPermission`).
pub mod perm {
    /// Reads see consistent data (nobody writes behind the reader's back).
    pub const CONSISTENT_READ: u8 = 1 << 0;
    pub const WRITE: u8 = 1 << 1;
    /// Writes that leave what readers see unchanged (commit, stream).
    pub const WRITE_UNCHANGED: u8 = 1 << 2;
    pub const RESIZE: u8 = 1 << 3;
    pub const ALL: u8 = CONSISTENT_READ | WRITE | WRITE_UNCHANGED | RESIZE;
    /// The bits that change the node's content or size.
    pub const WRITES: u8 = WRITE | WRITE_UNCHANGED | RESIZE;
    /// Number of bits.
    pub const COUNT: u8 = 4;

    /// QEMU's name of one bit.
    pub fn name(bit: u8) -> &'static str {
        match bit {
            CONSISTENT_READ => "consistent read",
            WRITE => "write",
            WRITE_UNCHANGED => "write unchanged",
            RESIZE => "resize",
            _ => "unknown",
        }
    }

    /// The names of the bits set in `bits`, comma separated (QEMU's style).
    pub fn names(bits: u8) -> String {
        (0..COUNT).map(|i| 1u8 << i).filter(|b| bits & b != 0).map(name).collect::<Vec<_>>().join(", ")
    }
}

/// What a claim's holder does with a node and what it lets others do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perms {
    pub perm: u8,
    pub shared: u8,
}

impl Perms {
    /// No use at all (a node nobody claims).
    pub const NONE: Perms = Perms { perm: 0, shared: perm::ALL };

    /// Reads, and lets everyone do anything (an export, a job's source).
    pub const fn read() -> Perms {
        Perms { perm: perm::CONSISTENT_READ, shared: perm::ALL }
    }

    /// Writes, sharing with other writers (a writable export).
    pub const fn write() -> Perms {
        Perms { perm: perm::CONSISTENT_READ | perm::WRITE, shared: perm::ALL }
    }

    /// Writes, and nobody else may read or write (a mirror's target, whose
    /// content is in flux until the job ends).
    pub const fn exclusive_write() -> Perms {
        Perms { perm: perm::WRITE, shared: perm::WRITE_UNCHANGED }
    }

    /// Writes data that readers of the node already see through the layers
    /// above it (a commit's base), and nobody else may write.
    pub const fn write_unchanged() -> Perms {
        Perms {
            perm: perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
            shared: perm::CONSISTENT_READ | perm::WRITE_UNCHANGED,
        }
    }

    /// A format driver's file: metadata lives there, so nobody else may
    /// write or resize it (QEMU's storage child with metadata).
    pub const fn format_file(write: bool) -> Perms {
        let shared = perm::CONSISTENT_READ | perm::WRITE_UNCHANGED;
        if write {
            Perms { perm: perm::CONSISTENT_READ | perm::WRITE | perm::RESIZE, shared }
        } else {
            Perms { perm: perm::CONSISTENT_READ, shared }
        }
    }

    /// The raw driver's file: data only; others may write, not resize.
    pub const fn data_file(write: bool) -> Perms {
        let shared = perm::ALL & !perm::RESIZE;
        if write {
            Perms { perm: perm::CONSISTENT_READ | perm::WRITE, shared }
        } else {
            Perms { perm: perm::CONSISTENT_READ, shared }
        }
    }

    /// A backing file: read where the overlay holds nothing. Others may
    /// write it, as in QEMU (whose backing links share writes when the
    /// overlay's users do, as exports do): the fleecing of an image relies
    /// on it — an overlay backed by a disk that keeps being written, kept
    /// consistent by copy-before-write. Writing a backing file behind an
    /// overlay's back is the user's choice; a backing file opened from an
    /// image's header is read-only and its file is locked against others.
    pub const fn backing() -> Perms {
        Perms { perm: perm::CONSISTENT_READ, shared: perm::ALL }
    }

    /// Shares everything (`force-share=on`).
    pub const fn sharing_all(self) -> Perms {
        Perms { perm: self.perm, shared: perm::ALL }
    }

    /// Needs write access to the node.
    pub fn writes(self) -> bool {
        self.perm & perm::WRITES != 0
    }

    /// What two claims together hold.
    pub fn union(self, other: Perms) -> Perms {
        Perms { perm: self.perm | other.perm, shared: self.shared & other.shared }
    }

    /// Bits `self` needs that `other` does not share, then bits `other`
    /// holds that `self` does not share.
    pub fn conflicts(self, other: Perms) -> (u8, u8) {
        (self.perm & !other.shared, other.perm & !self.shared)
    }
}

impl From<crate::graph::Access> for Perms {
    fn from(a: crate::graph::Access) -> Perms {
        match a {
            crate::graph::Access::Read => Perms::read(),
            crate::graph::Access::Write => Perms::write(),
            crate::graph::Access::ExclusiveWrite => Perms::exclusive_write(),
        }
    }
}

/// QEMU's `locking` option of the file driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LockMode {
    /// Lock where the file system supports OFD locks.
    #[default]
    Auto,
    On,
    Off,
}

impl LockMode {
    pub fn parse(v: Option<&str>) -> LockMode {
        match v {
            Some("on") => LockMode::On,
            Some("off") => LockMode::Off,
            _ => LockMode::Auto,
        }
    }
}

/// First byte of the "holds permission" locks (QEMU's RAW_LOCK_PERM_BASE).
pub const LOCK_PERM_BASE: i64 = 100;
/// First byte of the "does not share permission" locks (RAW_LOCK_SHARED_BASE).
pub const LOCK_SHARED_BASE: i64 = 200;

/// A file as the kernel knows it: symlinks, hard links and different
/// spellings of one path all meet here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    pub fn of(file: &File) -> std::io::Result<FileId> {
        let m = file.metadata()?;
        Ok(FileId { dev: m.dev(), ino: m.ino() })
    }
}

struct Holder {
    id: u64,
    /// The node's name, for messages and logs.
    node: String,
    perms: Perms,
    /// Takes part in the byte-range locks (and in the checks between
    /// this process's nodes, which stand in for them).
    locking: bool,
    /// Holders of one group never conflict with each other (an image and
    /// its writable twin).
    group: u64,
}

/// One file some node has open.
struct Entry {
    /// Holds this process's locks on the file; opened with the first
    /// holder that locks.
    lock_fd: Option<OwnedFd>,
    /// The bytes locked now: (held permissions, unshared permissions).
    locked: (u8, u8),
    holders: Vec<Holder>,
}

fn registry() -> MutexGuard<'static, HashMap<FileId, Entry>> {
    static REGISTRY: OnceLock<Mutex<HashMap<FileId, Entry>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner())
}

static NEXT_HOLDER: AtomicU64 = AtomicU64::new(1);

fn lock_error(bit: u8, shared: bool) -> BdevError {
    let name = perm::name(bit);
    BdevError::Locked(if shared {
        format!("Failed to get shared \"{name}\" lock")
    } else {
        format!("Failed to get \"{name}\" lock")
    })
}

/// The lowest bit set in `bits`.
fn first_bit(bits: u8) -> u8 {
    bits & bits.wrapping_neg()
}

fn flock(kind: libc::c_short, start: i64) -> libc::flock {
    libc::flock { l_type: kind, l_whence: libc::SEEK_SET as libc::c_short, l_start: start, l_len: 1, l_pid: 0 }
}

/// Takes (`lock`) or drops a shared lock on one byte.
fn set_byte(fd: &impl AsFd, start: i64, lock: bool) -> nix::Result<()> {
    let kind = if lock { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl(fd.as_fd(), FcntlArg::F_OFD_SETLK(&flock(kind as libc::c_short, start))).map(drop)
}

/// True when another open file description holds a lock on the byte.
fn byte_taken(fd: &impl AsFd, start: i64) -> nix::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, start);
    fcntl(fd.as_fd(), FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Moves the locks on `fd` from `from` to `to` (held, unshared bit sets).
fn apply_locks(fd: &impl AsFd, from: (u8, u8), to: (u8, u8)) -> nix::Result<()> {
    for i in 0..perm::COUNT {
        let bit = 1u8 << i;
        for (base, was, now) in [(LOCK_PERM_BASE, from.0, to.0), (LOCK_SHARED_BASE, from.1, to.1)] {
            if (was ^ now) & bit != 0 {
                set_byte(fd, base + i64::from(i), now & bit != 0)?;
            }
        }
    }
    Ok(())
}

/// Fails when another process's locks forbid `perms` (QEMU's checks and
/// messages: "Failed to get \"write\" lock").
fn check_others(fd: &impl AsFd, perms: Perms) -> Result<(), BdevError> {
    let os = |e: nix::errno::Errno| BdevError::Locked(format!("Failed to check the image lock: {}", e.desc()));
    for i in 0..perm::COUNT {
        let bit = 1u8 << i;
        if perms.perm & bit != 0 && byte_taken(fd, LOCK_SHARED_BASE + i64::from(i)).map_err(os)? {
            return Err(lock_error(bit, false));
        }
    }
    for i in 0..perm::COUNT {
        let bit = 1u8 << i;
        if perms.shared & bit == 0 && byte_taken(fd, LOCK_PERM_BASE + i64::from(i)).map_err(os)? {
            return Err(lock_error(bit, true));
        }
    }
    Ok(())
}

/// Locking is not available here (file system without OFD locks).
fn unsupported(e: nix::errno::Errno) -> bool {
    matches!(
        e,
        nix::errno::Errno::EINVAL
            | nix::errno::Errno::ENOSYS
            | nix::errno::Errno::EOPNOTSUPP
            | nix::errno::Errno::ENOLCK
    )
}

impl Entry {
    /// What this process's locking holders hold together.
    fn union(&self) -> Perms {
        self.holders.iter().filter(|h| h.locking).fold(Perms::NONE, |u, h| u.union(h.perms))
    }

    /// Brings the locks in line with the holders.
    fn relock(&mut self) -> nix::Result<()> {
        let u = self.union();
        let want = (u.perm, !u.shared & perm::ALL);
        if let Some(fd) = &self.lock_fd {
            apply_locks(fd, self.locked, want)?;
        }
        self.locked = want;
        Ok(())
    }
}

/// A node's hold on its file: registered while the node is open; its
/// permissions follow the node's claims ([`ImageLock::set_perms`]).
#[derive(Debug)]
pub struct ImageLock {
    file: FileId,
    holder: u64,
    group: u64,
    path: String,
}

impl ImageLock {
    /// Registers `file` (open as `path` for node `node`), holding nothing
    /// yet. With `group`, the node never conflicts with the group's other
    /// members (the twin of an image, see [`ImageLock::group`]).
    pub fn register(
        file: &File,
        path: &str,
        node: &str,
        mode: LockMode,
        group: Option<u64>,
    ) -> Result<ImageLock, BdevError> {
        let id = FileId::of(file).map_err(|source| BdevError::Open { path: path.to_string(), source })?;
        let holder = NEXT_HOLDER.fetch_add(1, Ordering::Relaxed);
        let group = group.unwrap_or(holder);
        let mut reg = registry();
        let entry = reg.entry(id).or_insert_with(|| Entry { lock_fd: None, locked: (0, 0), holders: Vec::new() });
        let mut locking = mode != LockMode::Off;
        if locking && entry.lock_fd.is_none() {
            // A duplicate shares the node's open file description; the
            // locks live as long as the entry keeps it.
            let fd: OwnedFd =
                file.try_clone().map_err(|source| BdevError::Open { path: path.to_string(), source })?.into();
            match byte_taken(&fd, LOCK_PERM_BASE) {
                Ok(_) => entry.lock_fd = Some(fd),
                Err(e) if mode == LockMode::Auto && unsupported(e) => {
                    tracing::debug!(path, error = %e, "no OFD locks on this file system; locking=auto goes without");
                    locking = false;
                }
                Err(e) => {
                    if entry.holders.is_empty() {
                        reg.remove(&id);
                    }
                    return Err(BdevError::Locked(format!("Failed to lock '{path}': {}", e.desc())));
                }
            }
        }
        entry.holders.push(Holder { id: holder, node: node.to_string(), perms: Perms::NONE, locking, group });
        Ok(ImageLock { file: id, holder, group, path: path.to_string() })
    }

    /// The group a twin of this node joins.
    pub fn group(&self) -> u64 {
        self.group
    }

    pub fn file_id(&self) -> FileId {
        self.file
    }

    /// Changes what the node holds and shares, checking this process's
    /// other nodes on the file and then everyone else's locks. On failure
    /// nothing changes.
    pub fn set_perms(&self, perms: Perms) -> Result<(), BdevError> {
        let mut reg = registry();
        let entry = reg.get_mut(&self.file).expect("a registered file stays registered");
        let me = entry.holders.iter().position(|h| h.id == self.holder).expect("holder registered");
        let (locking, old) = (entry.holders[me].locking, entry.holders[me].perms);
        if old == perms {
            return Ok(());
        }
        if locking {
            for h in entry.holders.iter().filter(|h| h.locking && h.group != self.group) {
                let (needed, unshared) = perms.conflicts(h.perms);
                if needed != 0 || unshared != 0 {
                    tracing::info!(path = %self.path, node = %entry.holders[me].node, other = %h.node,
                        "image lock conflict inside this process");
                    return Err(if needed != 0 {
                        lock_error(first_bit(needed), false)
                    } else {
                        lock_error(first_bit(unshared), true)
                    });
                }
            }
        }
        entry.holders[me].perms = perms;
        if !locking {
            return Ok(());
        }
        let checked = entry.relock().map_err(|e| BdevError::Locked(format!("Failed to lock byte: {}", e.desc())));
        let checked = checked.and_then(|()| match &entry.lock_fd {
            Some(fd) => check_others(fd, perms),
            None => Ok(()),
        });
        if let Err(e) = checked {
            entry.holders[me].perms = old;
            if let Err(e2) = entry.relock() {
                tracing::error!(path = %self.path, error = %e2, "restoring image locks failed");
            }
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        let mut reg = registry();
        let Some(entry) = reg.get_mut(&self.file) else { return };
        entry.holders.retain(|h| h.id != self.holder);
        // With the last holder gone this drops every lock: the descriptor
        // shares its open file description with the node's own, which may
        // stay open a little longer (in-flight requests hold it).
        if let Err(e) = entry.relock() {
            tracing::error!(path = %self.path, error = %e, "releasing image locks failed");
        }
        if entry.holders.is_empty() {
            reg.remove(&self.file);
        }
    }
}

/// The nodes that have `file` open, by name.
pub fn users(file: FileId) -> Vec<String> {
    registry().get(&file).map(|e| e.holders.iter().map(|h| h.node.clone()).collect()).unwrap_or_default()
}

/// A file being created or truncated: opened without truncating, refused
/// when any node of this process has it open (whatever its `locking`
/// setting) or when another process's locks forbid writing and resizing
/// it, and locked against others until dropped.
pub struct CreateLock {
    file: File,
    lock: Option<ImageLock>,
}

impl CreateLock {
    /// Opens (creating if needed) `path` for writing, refusing a file in use.
    pub fn acquire(path: &std::path::Path) -> Result<CreateLock, BdevError> {
        let shown = path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(libc::O_CLOEXEC)
            .mode(0o644)
            .open(path)
            .map_err(|source| BdevError::Open { path: shown.clone(), source })?;
        let id = FileId::of(&file).map_err(|source| BdevError::Open { path: shown.clone(), source })?;
        {
            let reg = registry();
            if let Some(e) = reg.get(&id).filter(|e| !e.holders.is_empty()) {
                let nodes: Vec<&str> = e.holders.iter().map(|h| h.node.as_str()).collect();
                tracing::info!(path = %shown, nodes = ?nodes, "refusing to create a file that is in use");
                if e.holders.iter().any(|h| h.locking) {
                    return Err(lock_error(perm::WRITE, false));
                }
                return Err(BdevError::Locked(format!(
                    "Could not create '{shown}': it is in use by node '{}'",
                    nodes.join("', '")
                )));
            }
        }
        // QEMU's creators write and resize, sharing everything but resizing.
        let lock = ImageLock::register(&file, &shown, "(creating)", LockMode::On, None)?;
        lock.set_perms(Perms { perm: perm::WRITE | perm::RESIZE, shared: perm::ALL & !perm::RESIZE })?;
        Ok(CreateLock { file, lock: Some(lock) })
    }

    /// The file, open for reading and writing.
    pub fn file(&self) -> &File {
        &self.file
    }
}

impl Drop for CreateLock {
    fn drop(&mut self) {
        // The registration goes first: it holds a duplicate of the file.
        self.lock.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).unwrap()
    }

    fn taken(path: &std::path::Path, byte: i64) -> bool {
        // A fresh open file description sees this process's locks as foreign.
        byte_taken(&File::open(path).unwrap(), byte).unwrap()
    }

    #[test]
    fn claims_conflict_on_unshared_bits() {
        let w = Perms::format_file(true);
        let r = Perms::format_file(false);
        assert_eq!(w.conflicts(r), (perm::WRITE | perm::RESIZE, 0));
        assert_eq!(r.conflicts(w), (0, perm::WRITE | perm::RESIZE));
        assert_eq!(r.conflicts(r), (0, 0));
        assert_eq!(Perms::read().conflicts(Perms::exclusive_write()).0, perm::CONSISTENT_READ);
        assert_eq!(Perms::write_unchanged().conflicts(Perms::backing()), (0, 0));
        assert_eq!(Perms::write().conflicts(Perms::backing()), (0, 0));
        assert_eq!(perm::names(perm::CONSISTENT_READ | perm::WRITE), "consistent read, write");
    }

    #[test]
    fn locks_use_qemus_bytes_and_follow_the_union() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = open(&p);
        let l = ImageLock::register(&f, "img", "n", LockMode::On, None).unwrap();
        l.set_perms(Perms::format_file(true)).unwrap();
        for (byte, held) in
            [(100, true), (101, true), (102, false), (103, true), (200, false), (201, true), (203, true)]
        {
            assert_eq!(taken(&p, byte), held, "byte {byte}");
        }
        l.set_perms(Perms::format_file(false)).unwrap();
        assert!(!taken(&p, 101) && !taken(&p, 103) && taken(&p, 100) && taken(&p, 201));
        drop(l);
        assert!(!taken(&p, 100) && !taken(&p, 201));
    }

    #[test]
    fn two_nodes_of_one_process_conflict_unless_twins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let (f1, f2, f3) = (open(&p), open(&p), open(&p));
        let ro = ImageLock::register(&f1, "img", "ro", LockMode::Auto, None).unwrap();
        ro.set_perms(Perms::format_file(false)).unwrap();
        let rw = ImageLock::register(&f2, "img", "rw", LockMode::Auto, None).unwrap();
        assert_eq!(rw.set_perms(Perms::format_file(true)).unwrap_err().to_string(), "Failed to get \"write\" lock");
        let twin = ImageLock::register(&f3, "img", "twin", LockMode::Auto, Some(ro.group())).unwrap();
        twin.set_perms(Perms::format_file(true)).unwrap();
        // locking=off takes part in no check.
        let off = ImageLock::register(&f2, "img", "off", LockMode::Off, None).unwrap();
        off.set_perms(Perms::format_file(true)).unwrap();
        assert_eq!(users(ro.file_id()).len(), 4);
    }

    #[test]
    fn creating_a_file_in_use_is_refused_whatever_the_locking() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"data").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let f = open(&p);
        let l = ImageLock::register(&f, "img", "n0", LockMode::Off, None).unwrap();
        let e = CreateLock::acquire(&link).err().unwrap().to_string();
        assert!(e.contains("in use by node 'n0'"), "{e}");
        drop(l);
        let l = ImageLock::register(&f, "img", "n0", LockMode::On, None).unwrap();
        assert_eq!(CreateLock::acquire(&link).err().unwrap().to_string(), "Failed to get \"write\" lock");
        drop(l);
        let c = CreateLock::acquire(&link).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"data", "acquiring truncates nothing");
        assert!(taken(&p, 101) && taken(&p, 103) && taken(&p, 203));
        drop(c);
        assert!(!taken(&p, 101));
    }
}
