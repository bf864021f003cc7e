//! Aligned I/O memory: [`IoBuf`], the per-thread buffer pool behind it, and
//! [`MemRegion`], the shared anonymous mapping that backs RAM devices.
//!
//! One of the two modules of the workspace that hold `unsafe` (the other is
//! `uring`). Every buffer the kernel may touch is an `IoBuf`: memory
//! aligned to [`IO_ALIGN`] (from the heap when small, in huge pages and
//! aligned to its own size from 64 KiB up), always initialised (fresh
//! buffers are zeroed, pooled ones hold old data), owned by exactly one
//! value at a time. An in-flight operation owns its `IoBuf` until its
//! completion hands it back.

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::ptr::NonNull;

/// Alignment of every `IoBuf`: enough for O_DIRECT on any logical block size
/// up to 4 KiB and for page-granular registration.
pub const IO_ALIGN: usize = 4096;

/// Smallest pooled capacity (class 0).
const POOL_CLASS_MIN_BYTES: usize = 4096;
/// Number of power-of-two size classes: 4 KiB .. 4 MiB.
const POOL_CLASSES: usize = 11;
/// Buffers of this capacity and above live in huge pages (see [`map_huge`]).
const HUGE_BUF_MIN: usize = 64 << 10;
/// The transparent huge page size that [`map_huge`] aligns to.
const HUGE_PAGE: usize = 2 << 20;
/// Bytes each class may keep cached per thread before buffers go back to the allocator.
const POOL_CLASS_CACHE_BYTES: usize = 32 << 20;
/// A class keeps at least this many buffers regardless of its byte budget.
const POOL_CLASS_CACHE_MIN: usize = 4;

/// An owned, aligned, initialised byte buffer for I/O.
///
/// `len` is the logical length (what `as_slice` shows); `cap` is the
/// allocation. Bytes between `len` and `cap` are initialised too, so
/// `set_len` is safe.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf uniquely owns its allocation (no aliasing handle exists), like
// Vec<u8>, so moving it to another thread is sound.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reads of initialised bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `len` bytes with unspecified (but initialised) contents,
    /// taken from this thread's pool when one of the right class is cached.
    pub fn new(len: usize) -> IoBuf {
        let cap = class_cap(len);
        let ptr = POOL.with(|p| {
            let mut pool = p.borrow_mut();
            pool.take(cap).unwrap_or_else(|| pool.fresh(cap))
        });
        IoBuf { ptr, len, cap }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> IoBuf {
        let mut buf = IoBuf::new(len);
        buf.as_mut_slice().fill(0);
        buf
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> IoBuf {
        let mut buf = IoBuf::new(data.len());
        buf.as_mut_slice().copy_from_slice(data);
        buf
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the logical length; `len` must not exceed the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len {len} beyond capacity {}", self.cap);
        self.len = len;
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialised bytes and uniquely
        // owned; the shared borrow of self prevents concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and the exclusive borrow of self makes this
        // the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Raw pointer for the kernel. Only the `uring` module hands it out, while
    /// the owning operation keeps this buffer alive.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl std::ops::Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).field("cap", &self.cap).finish()
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let ptr = self.ptr;
        let cap = self.cap;
        // During thread teardown the pool may already be gone: free directly.
        let kept = POOL.try_with(|p| p.try_borrow_mut().map(|mut p| p.put(ptr, cap)).unwrap_or(false)).unwrap_or(false);
        if !kept {
            dealloc(ptr, cap);
        }
    }
}

/// Capacity used for a request of `len` bytes: the power-of-two class for
/// poolable sizes, the page-rounded length above them.
fn class_cap(len: usize) -> usize {
    let len = len.max(1);
    let pooled_max = POOL_CLASS_MIN_BYTES << (POOL_CLASSES - 1);
    if len <= pooled_max {
        len.next_power_of_two().max(POOL_CLASS_MIN_BYTES)
    } else {
        len.div_ceil(IO_ALIGN) * IO_ALIGN
    }
}

fn class_index(cap: usize) -> Option<usize> {
    if !cap.is_power_of_two() || cap < POOL_CLASS_MIN_BYTES {
        return None;
    }
    let idx = (cap / POOL_CLASS_MIN_BYTES).trailing_zeros() as usize;
    (idx < POOL_CLASSES).then_some(idx)
}

fn layout(cap: usize) -> Layout {
    Layout::from_size_align(cap, IO_ALIGN).expect("IoBuf layout: capacity overflows isize")
}

fn alloc_zeroed(cap: usize) -> NonNull<u8> {
    let layout = layout(cap);
    // SAFETY: layout has a non-zero size (cap >= 4096).
    let ptr = unsafe { alloc::alloc_zeroed(layout) };
    NonNull::new(ptr).unwrap_or_else(|| alloc::handle_alloc_error(layout))
}

/// Bytes of address space behind a buffer of capacity `cap`: huge-page
/// buffers of 2 MiB and more own whole huge pages, smaller ones a piece of one.
fn mapped_len(cap: usize) -> usize {
    if cap >= HUGE_PAGE { cap.next_multiple_of(HUGE_PAGE) } else { cap }
}

/// Maps `len` (a multiple of [`HUGE_PAGE`]) zeroed bytes aligned to
/// [`HUGE_PAGE`] and asks for transparent huge pages there.
///
/// Why: a large O_DIRECT transfer is split by the block layer into requests
/// of at most `max_segments` physically contiguous runs (254 on virtio-blk),
/// so a 1 MiB buffer of scattered 4 KiB pages becomes two requests, and
/// neighbouring transfers seldom merge. In a huge page the whole buffer is
/// one run: one request per transfer, adjacent ones merge up to the device's
/// `max_sectors_kb`, and even a 64 KiB transfer hands the device one segment
/// instead of sixteen. Without THP the mapping works the same, only smaller.
fn map_huge(len: usize) -> NonNull<u8> {
    let span = len + HUGE_PAGE;
    // SAFETY: a fresh private anonymous mapping touches no existing memory.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        alloc::handle_alloc_error(Layout::from_size_align(len, HUGE_PAGE).expect("huge buffer layout"));
    }
    let base = raw as usize;
    let start = base.next_multiple_of(HUGE_PAGE);
    let end = start + len;
    if start > base {
        // SAFETY: the head [base, start) lies inside the mapping just made
        // and outside the aligned range kept.
        unsafe { libc::munmap(raw, start - base) };
    }
    if base + span > end {
        // SAFETY: as for the head, the tail [end, base + span).
        unsafe { libc::munmap(end as *mut libc::c_void, base + span - end) };
    }
    // Advice only: the memory is usable whatever the kernel answers.
    // SAFETY: the range is the part of the mapping kept.
    unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
    NonNull::new(start as *mut u8).expect("mmap returned a null mapping")
}

fn dealloc(ptr: NonNull<u8>, cap: usize) {
    if cap >= HUGE_BUF_MIN {
        // SAFETY: ptr..ptr+mapped_len(cap) is this buffer's own part of a
        // map_huge mapping (handed to exactly one buffer), unmapped once;
        // unmapping a piece of a mapping leaves the other pieces mapped.
        unsafe { libc::munmap(ptr.as_ptr().cast(), mapped_len(cap)) };
        return;
    }
    // SAFETY: ptr came from alloc_zeroed with the same layout (cap never
    // changes after allocation) and is not used again.
    unsafe { alloc::dealloc(ptr.as_ptr(), layout(cap)) }
}

/// Free lists per size class, one per thread: no locks, no sharing.
struct BufPool {
    classes: [Vec<NonNull<u8>>; POOL_CLASSES],
}

impl BufPool {
    /// New memory for a buffer of capacity `cap` when the pool has none.
    /// Capacities below a huge page are cut from a fresh one: this buffer
    /// takes the first piece, the class keeps the rest.
    fn fresh(&mut self, cap: usize) -> NonNull<u8> {
        if cap < HUGE_BUF_MIN {
            return alloc_zeroed(cap);
        }
        if cap >= HUGE_PAGE {
            return map_huge(mapped_len(cap));
        }
        let chunk = map_huge(HUGE_PAGE);
        for at in (cap..HUGE_PAGE).step_by(cap) {
            let piece = NonNull::new(chunk.as_ptr().wrapping_add(at)).expect("piece of a mapping is not null");
            if !self.put(piece, cap) {
                dealloc(piece, cap);
            }
        }
        chunk
    }

    fn take(&mut self, cap: usize) -> Option<NonNull<u8>> {
        self.classes[class_index(cap)?].pop()
    }

    /// Keeps the buffer if its class has room; false means the caller frees it.
    fn put(&mut self, ptr: NonNull<u8>, cap: usize) -> bool {
        let Some(idx) = class_index(cap) else {
            return false;
        };
        let keep_max = (POOL_CLASS_CACHE_BYTES / cap).max(POOL_CLASS_CACHE_MIN);
        let class = &mut self.classes[idx];
        if class.len() >= keep_max {
            return false;
        }
        class.push(ptr);
        true
    }
}

impl Drop for BufPool {
    fn drop(&mut self) {
        for (idx, class) in self.classes.iter_mut().enumerate() {
            for ptr in class.drain(..) {
                dealloc(ptr, POOL_CLASS_MIN_BYTES << idx);
            }
        }
    }
}

thread_local! {
    static POOL: RefCell<BufPool> = RefCell::new(BufPool { classes: Default::default() });
}

/// A zero-filled anonymous memory mapping shared by all reactors: the
/// backing store of RAM devices.
///
/// The mapping is never exposed as a Rust reference; bytes move in and out by
/// copies only. Concurrent requests to overlapping ranges are, as on any
/// block device, the client's business: they yield some interleaving of the
/// bytes written, never memory unsafety for the daemon, because no Rust
/// object lives in the mapping.
pub struct MemRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory accessed only through bounds-checked
// copies (see the type's documentation); the pointer itself is shareable.
unsafe impl Send for MemRegion {}
// SAFETY: as for Send.
unsafe impl Sync for MemRegion {}

impl MemRegion {
    /// Maps `len` bytes of zeroed, lazily committed memory.
    pub fn new(len: usize) -> std::io::Result<MemRegion> {
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "size must be non-zero"));
        }
        // SAFETY: a fresh private anonymous mapping touches no existing memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Huge pages where the kernel offers them (transparent huge pages in
        // `madvise` mode): a RAM disk read then costs no TLB miss per 4 KiB.
        // Advice only; without it the region works the same.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(MemRegion { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of byte `offset` (bounds are checked by the callers).
    fn at(&self, offset: usize) -> *mut u8 {
        self.ptr.as_ptr().wrapping_add(offset)
    }

    fn check(&self, offset: usize, len: usize) {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "MemRegion access {offset}+{len} beyond {}",
            self.len
        );
    }

    /// Copies `dst.len()` bytes starting at `offset` into `dst`.
    pub fn read(&self, offset: usize, dst: &mut [u8]) {
        self.check(offset, dst.len());
        // SAFETY: the range is inside the mapping (checked above), dst is a
        // distinct Rust buffer, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(self.at(offset), dst.as_mut_ptr(), dst.len()) }
    }

    /// Copies `src` into the region at `offset`.
    pub fn write(&self, offset: usize, src: &[u8]) {
        self.check(offset, src.len());
        // SAFETY: in bounds (checked above); src is a Rust buffer outside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.at(offset), src.len()) }
    }

    /// Sets `len` bytes at `offset` to zero.
    pub fn zero(&self, offset: usize, len: usize) {
        self.check(offset, len);
        // SAFETY: in bounds (checked above).
        unsafe { std::ptr::write_bytes(self.at(offset), 0, len) }
    }

    /// True when every byte of the range is zero (used for block status).
    pub fn is_zero(&self, offset: usize, len: usize) -> bool {
        self.check(offset, len);
        let mut chunk = [0u8; 4096];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(chunk.len());
            self.read(at, &mut chunk[..n]);
            if chunk[..n].iter().any(|&b| b != 0) {
                return false;
            }
            at += n;
        }
        true
    }

    /// Gives whole pages inside the range back to the kernel (they read as
    /// zero afterwards) and zeroes the unaligned edges.
    pub fn discard(&self, offset: usize, len: usize) {
        self.check(offset, len);
        let page = 4096;
        let start = offset.div_ceil(page) * page;
        let end = (offset + len) / page * page;
        if start >= end {
            self.zero(offset, len);
            return;
        }
        self.zero(offset, start - offset);
        self.zero(end, offset + len - end);
        // SAFETY: [start, end) is page aligned and inside the private
        // anonymous mapping; MADV_DONTNEED on it only drops its pages, which
        // read back as zero, exactly the semantics we want.
        let rc = unsafe { libc::madvise(self.at(start).cast(), end - start, libc::MADV_DONTNEED) };
        if rc != 0 {
            self.zero(start, end - start);
        }
    }
}

impl Drop for MemRegion {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe the mapping created in new(), unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_and_sized() {
        for len in [1, 512, 4096, 4097, 65536, 1 << 20, 5 << 20] {
            let mut b = IoBuf::new(len);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len);
            assert_eq!(b.as_mut_ptr() as usize % IO_ALIGN, 0);
        }
    }

    #[test]
    fn pooled_buffer_is_reused_on_the_same_thread() {
        let mut a = IoBuf::new(8192);
        let p = a.as_mut_ptr();
        drop(a);
        let mut b = IoBuf::new(5000);
        assert_eq!(b.as_mut_ptr(), p, "class 8 KiB buffer should come back from the pool");
    }

    #[test]
    fn large_buffers_sit_whole_inside_huge_pages() {
        // Aligned to their own capacity (to 2 MiB from 2 MiB up), a buffer
        // never straddles a huge page boundary: the kernel sees one
        // physically contiguous run when THP backs the mapping.
        let caps = [64 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20, 4 << 20, 5 << 20];
        let mut held = Vec::new();
        for cap in caps {
            for _ in 0..12 {
                let mut b = IoBuf::new(cap);
                let align = cap.next_power_of_two().min(HUGE_PAGE);
                assert_eq!(b.as_mut_ptr() as usize % align, 0, "capacity {cap}");
                assert!(b.iter().all(|&x| x == 0), "fresh memory reads as zero");
                b.fill(0x5a);
                held.push(b);
            }
        }
        // Pieces of one huge page are separate buffers: writing one leaves
        // its neighbours alone, and each can be freed on its own (from
        // another thread too, where the pool of that thread takes it).
        assert!(held.iter().all(|b| b.iter().all(|&x| x == 0x5a)));
        let (keep, give): (Vec<_>, Vec<_>) = held.into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
        std::thread::spawn(move || drop(give)).join().unwrap();
        assert!(keep.iter().all(|(_, b)| b.iter().all(|&x| x == 0x5a)));
    }

    #[test]
    fn huge_pieces_beyond_the_pool_budget_are_unmapped_one_by_one() {
        // More 256 KiB buffers than the class keeps: dropping them unmaps
        // pieces of shared huge pages while other pieces stay in use.
        let n = POOL_CLASS_CACHE_BYTES / (256 << 10) * 3;
        let bufs: Vec<IoBuf> = (0..n).map(|_| IoBuf::new(256 << 10)).collect();
        let (odd, even): (Vec<_>, Vec<_>) = bufs.into_iter().enumerate().partition(|(i, _)| i % 2 == 1);
        drop(odd);
        for (_, mut b) in even {
            b.fill(1);
        }
        let mut again = IoBuf::new(256 << 10);
        again.fill(2);
    }

    #[test]
    fn zeroed_and_from_slice() {
        let mut a = IoBuf::new(4096);
        a.fill(0xaa);
        drop(a);
        let z = IoBuf::zeroed(4096);
        assert!(z.iter().all(|&b| b == 0));
        let c = IoBuf::from_slice(b"hello");
        assert_eq!(&c[..], b"hello");
    }

    #[test]
    fn set_len_within_capacity() {
        let mut b = IoBuf::new(100);
        b.set_len(4096);
        assert_eq!(b.len(), 4096);
    }

    #[test]
    #[should_panic]
    fn set_len_beyond_capacity_panics() {
        let mut b = IoBuf::new(100);
        b.set_len(1 << 20);
    }

    #[test]
    fn mem_region_roundtrip_and_discard() {
        let r = MemRegion::new(1 << 20).unwrap();
        assert!(r.is_zero(0, 1 << 20));
        r.write(4095, &[1, 2, 3]);
        let mut out = [0u8; 3];
        r.read(4095, &mut out);
        assert_eq!(out, [1, 2, 3]);
        assert!(!r.is_zero(0, 8192));
        r.discard(4000, 10000);
        assert!(r.is_zero(0, 1 << 20));
    }

    #[test]
    #[should_panic]
    fn mem_region_rejects_out_of_bounds() {
        let r = MemRegion::new(4096).unwrap();
        r.write(4095, &[0, 0]);
    }
}
