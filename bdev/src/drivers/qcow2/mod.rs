//! `qcow2`: QEMU's copy-on-write image format, read and written the way
//! QEMU reads and writes it (docs/interop/qcow2.rst).
//!
//! ```text
//!   header.rs    the header and its extensions (parse, validate, serialise)
//!   entry.rs     L1/L2 entries, compressed clusters, refcount widths
//!   cache.rs     LRU caches for L2 tables and refcount blocks
//!   state.rs     the open image on its home reactor: the state the parts
//!                below share, and opening it
//!   mapping.rs   L1/L2 lookups, the L2 cache's use, entry checks
//!   refcount.rs  the refcount table and blocks: get, update, write back
//!   alloc.rs     the allocator, new refcount blocks, a grown refcount
//!                table, growing the file ahead
//!   reuse.rs     when a freed cluster may be handed out again: epochs of
//!                requests in flight, free runs
//!   writeback.rs flushes: the order metadata reaches the file in (the
//!                crash-ordering rules), dropped references
//!   request.rs   read, write, write-zeroes, discard, block status; the
//!                fast path
//!   compress.rs  compressed cluster writes: compressing, packing the
//!                compressed bytes into host clusters
//!   corrupt.rs   corruption: fencing, the corrupt bit, the event
//!   overlap.rs   where metadata lies: every write is checked against it
//!   snapshot.rs  the internal snapshot table (kept, read for its extent)
//!   rebuild.rs   refcounts recomputed for images left dirty
//!   create.rs    a new, empty image
//! ```
//!
//! The image's state lives on its home reactor — that of its backing chain,
//! or the least loaded one (`Graph::place`); other reactors forward their
//! requests there. The backing chain opens by
//! itself from the header's backing file name unless `backing` says
//! otherwise.

mod alloc;
mod cache;
mod compress;
mod corrupt;
pub mod create;
pub mod entry;
pub mod header;
mod mapping;
pub mod overlap;
mod rebuild;
mod refcount;
mod request;
mod reuse;
mod snapshot;
mod state;
#[cfg(test)]
mod testing;
mod writeback;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, Ordering as AtomicOrdering};

use reactor::Handle;
use serde_json::{Value, json};

use self::header::{Header, autoclear, compat, incompat};
use self::state::{Alarm, Backing, CacheSizes, Qcow2, Settings};
use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::channel::{BlockChannel, ChannelPolicy};
use crate::error::{BdevError, IoError};
use crate::forward::ForwardChannel;
use crate::graph::{Node, OpenCtx};
use crate::io::{BlockStatus, Done, Io};
use crate::lock::Perms;
use crate::options::{DetectZeroes, DiscardMode, OptReader};

/// Backing chains deeper than this are refused (a loop guard and a bound).
pub const CHAIN_DEPTH_MAX: usize = 256;
/// QEMU's default cap for the L2 cache.
const L2_CACHE_BYTES_DEFAULT_MAX: u64 = 32 << 20;
/// Refcount blocks cached by default.
const REFCOUNT_CACHE_BLOCKS_DEFAULT: u64 = 64;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Open images whose home is this reactor.
    static IMAGES: RefCell<HashMap<u64, Rc<Qcow2>>> = RefCell::new(HashMap::new());
    /// Canonical paths of the images being opened on this (control)
    /// thread, outermost first: a backing file already here is a loop.
    static OPENING: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

fn image(id: u64) -> Option<Rc<Qcow2>> {
    IMAGES.with(|m| m.borrow().get(&id).cloned())
}

/// A channel on a node's file child that takes metadata-sized requests
/// anywhere in the file (it grows), with the child's alignment bouncing.
fn file_channel(node: &Node) -> Result<BlockChannel, BdevError> {
    let ch = node.channel()?;
    Ok(BlockChannel::new(
        Rc::clone(ch.raw()),
        ChannelPolicy {
            size: u64::MAX,
            block_size: ch.block_size(),
            read_only: ch.read_only(),
            discard: DiscardMode::Unmap,
            detect_zeroes: DetectZeroes::Off,
            compress: false,
        },
    ))
}

pub struct Qcow2Bdev {
    id: u64,
    /// Where the state lives; changes when the node moves (`rehome`).
    home: std::sync::Mutex<Handle>,
    /// How the state was opened, to open it again elsewhere.
    opened: Opened,
    size: u64,
    block_size: u32,
    read_only: bool,
    file: Arc<Node>,
    backing: std::sync::Mutex<Option<Arc<Node>>>,
    format_specific: Value,
    /// Found corrupt while open: fenced, read-only from then on.
    fenced: Arc<AtomicBool>,
}

/// Pops the loop-detection stack when an open returns.
struct OpeningGuard;

impl Drop for OpeningGuard {
    fn drop(&mut self) {
        OPENING.with(|s| s.borrow_mut().pop());
    }
}

fn cache_sizes(l2_bytes: Option<u64>, rc_bytes: Option<u64>, total: Option<u64>, h: &Header) -> CacheSizes {
    let cs = h.cluster_size();
    // Enough L2 tables to map the whole disk, up to QEMU's default cap.
    let covering = h.size.div_ceil((cs / 8) * cs) * cs;
    let l2 = l2_bytes.or(total.map(|t| t * 3 / 4)).unwrap_or(covering.clamp(cs, L2_CACHE_BYTES_DEFAULT_MAX.max(cs)));
    let rc = rc_bytes.or(total.map(|t| t / 4)).unwrap_or(REFCOUNT_CACHE_BLOCKS_DEFAULT * cs);
    CacheSizes { l2_tables: (l2 / cs).max(2) as usize, refcount_blocks: (rc / cs).max(4) as usize }
}

/// Opens the node named by the header's backing file name.
fn open_backing_from_header(
    ctx: &mut OpenCtx<'_>,
    file: &Node,
    name: &str,
    format: Option<String>,
) -> Result<Arc<Node>, BdevError> {
    let path = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        let ours = file.bdev().info().filename;
        if ours.starts_with("json:") {
            return Err(BdevError::invalid(format!(
                "Cannot use relative backing file name '{name}' for an image that is not a file; give 'backing' explicitly"
            )));
        }
        Path::new(&ours).parent().unwrap_or(Path::new("/")).join(name)
    };
    let format = match format {
        Some(f) => f,
        None => probe_format(&path)?,
    };
    if format != "qcow2" && format != "raw" {
        return Err(BdevError::Unsupported(format!("backing file format '{format}' is not supported (qcow2 or raw)")));
    }
    let opts = json!({
        "driver": format,
        "read-only": true,
        "file": {"driver": "file", "filename": path, "read-only": true},
    });
    ctx.open_child("backing", opts, Perms::backing())
        .map_err(|e| BdevError::invalid(format!("Could not open backing file '{}': {e}", path.display())))
}

/// qcow2 when the file starts with the qcow2 magic, raw otherwise.
fn probe_format(path: &Path) -> Result<String, BdevError> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let n = std::fs::File::open(path)
        .and_then(|mut f| f.read(&mut magic))
        .map_err(|source| BdevError::Open { path: path.display().to_string(), source })?;
    Ok(if n == 4 && u32::from_be_bytes(magic) == header::MAGIC { "qcow2".into() } else { "raw".into() })
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let file_ref = opts.take("file").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("file"))?;
    let backing_opt = opts.take("backing");
    let l2_bytes = opts.u64_opt("l2-cache-size")?;
    let rc_bytes = opts.u64_opt("refcount-cache-size")?;
    let total_bytes = opts.u64_opt("cache-size")?;
    // Accepted for QEMU compatibility; their effects are Spindle's defaults.
    opts.bool_opt("lazy-refcounts")?;
    for k in ["pass-discard-request", "pass-discard-snapshot", "pass-discard-other", "discard-no-unref"] {
        opts.bool_opt(k)?;
    }
    opts.u64_opt("cache-clean-interval")?;
    opts.u64_opt("l2-cache-entry-size")?;
    let overlap_check = overlap::parse_option(opts.take("overlap-check"))?;
    if opts.take("encrypt").is_some() {
        return Err(BdevError::Unsupported("qcow2: encryption is not supported yet".into()));
    }
    if opts.take("data-file").is_some() {
        return Err(BdevError::Unsupported("qcow2: external data files are not supported".into()));
    }
    opts.finish()?;
    let read_only = ctx.common().read_only;
    let file = ctx.open_child("file", file_ref, Perms::format_file(!read_only))?;
    let read_only = read_only || file.read_only();

    // Loop detection: the same file twice in one chain.
    let canonical = std::fs::canonicalize(file.bdev().info().filename).ok();
    let _opening = match canonical {
        Some(path) => {
            let looped = OPENING.with(|s| s.borrow().contains(&path));
            if looped {
                return Err(BdevError::invalid(format!(
                    "Backing file loop detected: '{}' is its own backing file",
                    path.display()
                )));
            }
            let depth = OPENING.with(|s| {
                s.borrow_mut().push(path);
                s.borrow().len()
            });
            let guard = OpeningGuard;
            if depth > CHAIN_DEPTH_MAX {
                return Err(BdevError::invalid(format!("backing chain deeper than {CHAIN_DEPTH_MAX} images")));
            }
            Some(guard)
        }
        None => None,
    };

    let file_size = file.size();
    let hdr_node = Arc::clone(&file);
    let header = ctx
        .main_reactor()
        .run(move || async move { read_header(&hdr_node, file_size).await })
        .wait()
        .map_err(|_| BdevError::ReactorGone)??;

    let backing = match backing_opt {
        Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Object(_))) => Some(ctx.open_child("backing", v, Perms::backing())?),
        Some(_) => return Err(BdevError::invalid("Invalid parameter type for 'backing', expected: BlockdevRefOrNull")),
        None => match header.backing_file.clone() {
            Some(name) => Some(open_backing_from_header(ctx, &file, &name, header.backing_format())?),
            None => None,
        },
    };

    let caches = cache_sizes(l2_bytes, rc_bytes, total_bytes, &header);
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let format_specific = format_specific(&header);
    let size = header.size;
    let (f, b) = (Arc::clone(&file), backing.clone());
    let home = ctx.home();
    let fenced = Arc::new(AtomicBool::new(false));
    let alarm = Alarm { node_name: ctx.node_name().to_string(), events: ctx.events(), fenced: Arc::clone(&fenced) };
    // Only a plain file with O_DIRECT is grown ahead of the allocator: the
    // file system serialises direct writes that extend a file, while
    // buffered ones (tmpfs, cache.direct=off) cost nothing extra there, and
    // preallocating would only zero memory that the data overwrites.
    let grow = file.driver() == "file" && file.bdev().info().direct;
    let opened = Opened { read_only, caches, grow, overlap_check, alarm };
    let settings = opened.settings();
    home.run(move || async move { init_state(id, &f, b.as_deref(), file_size, header, settings).await })
        .wait()
        .map_err(|_| BdevError::ReactorGone)??;
    Ok(Arc::new(Qcow2Bdev {
        id,
        home: std::sync::Mutex::new(home),
        opened,
        size,
        block_size: file.bdev().block_size(),
        read_only,
        file,
        backing: std::sync::Mutex::new(backing),
        format_specific,
        fenced,
    }))
}

/// The settings of an open image, kept to open its state again.
#[derive(Clone)]
struct Opened {
    read_only: bool,
    caches: CacheSizes,
    grow: bool,
    overlap_check: u16,
    alarm: Alarm,
}

impl Opened {
    fn settings(&self) -> Settings {
        let o = self.clone();
        Settings {
            read_only: o.read_only,
            caches: o.caches,
            grow: o.grow,
            overlap_check: o.overlap_check,
            alarm: o.alarm,
        }
    }
}

async fn read_header(file: &Node, file_size: u64) -> Result<Header, BdevError> {
    read_header_from(&file_channel(file)?, file_size).await
}

async fn read_header_from(ch: &BlockChannel, file_size: u64) -> Result<Header, BdevError> {
    let io_err = |source: IoError| BdevError::Io { what: "reading the qcow2 header".into(), source };
    if file_size < header::V2_HEADER_BYTES as u64 {
        return Err(BdevError::invalid("qcow2: Image is not in qcow2 format"));
    }
    let head = ch.read(0, file_size.min(4096) as usize).await.map_err(io_err)?;
    let cluster_bits = Header::peek_cluster_bits(&head)?;
    let cluster0 = file_size.min(1 << cluster_bits) as usize;
    let buf = if cluster0 > head.len() { ch.read(0, cluster0).await.map_err(io_err)? } else { head };
    let h = Header::parse(&buf)?;
    h.validate(file_size)?;
    Ok(h)
}

async fn init_state(
    id: u64,
    file: &Node,
    backing: Option<&Node>,
    file_size: u64,
    header: Header,
    settings: Settings,
) -> Result<(), BdevError> {
    let read_only = settings.read_only;
    let io_err = |what: &str| {
        let what = what.to_string();
        move |source: IoError| BdevError::Io { what, source }
    };
    if !read_only && header.incompatible & incompat::CORRUPT != 0 {
        return Err(BdevError::invalid(
            "qcow2: the image is marked corrupt and cannot be opened read-write (repair it with 'qemu-img check -r all')",
        ));
    }
    let backing = match backing {
        Some(b) => Some(Backing { ch: b.channel()?, size: b.size() }),
        None => None,
    };
    let dirty = header.incompatible & incompat::DIRTY != 0;
    let state = Qcow2::open(file_channel(file)?, file_size, header, backing, settings)
        .await
        .map_err(io_err("loading the qcow2 tables"))?;
    if !read_only {
        if dirty {
            // Refcounts may be stale (lazy refcounts): rebuild them, as QEMU does.
            rebuild::rebuild_refcounts(&state).await.map_err(io_err("rebuilding the refcounts of a dirty image"))?;
        }
        let mut changed = false;
        {
            let mut h = state.header.borrow_mut();
            // Autoclear features Spindle does not maintain (persistent
            // bitmaps, raw external data) are invalidated by our writes.
            if h.autoclear != 0 {
                h.autoclear = 0;
                changed = true;
            }
        }
        if changed {
            state.write_header().await.map_err(io_err("updating the qcow2 header"))?;
            state.file().flush().await.map_err(io_err("updating the qcow2 header"))?;
        }
    }
    IMAGES.with(|m| m.borrow_mut().insert(id, state));
    Ok(())
}

fn format_specific(h: &Header) -> Value {
    json!({
        "type": "qcow2",
        "data": {
            "compat": if h.version >= 3 { "1.1" } else { "0.10" },
            "lazy-refcounts": h.compatible & compat::LAZY_REFCOUNTS != 0,
            "refcount-bits": h.refcount_bits(),
            "corrupt": h.incompatible & incompat::CORRUPT != 0,
            "extended-l2": false,
            "compression-type": if h.compression() == header::Compression::Zstd { "zstd" } else { "zlib" },
            "cluster-size": h.cluster_size(),
            "bitmaps-valid": h.autoclear & autoclear::BITMAPS != 0,
        }
    })
}

impl Qcow2Bdev {
    pub fn backing(&self) -> Option<Arc<Node>> {
        self.backing.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn current_home(&self) -> Handle {
        self.home.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Opens the state on `home` from what is on disk (`file_end`: how far
    /// the image file reaches).
    fn load_on(&self, home: &Handle, file_end: u64) -> Result<(), BdevError> {
        let (id, file, backing, settings) = (self.id, Arc::clone(&self.file), self.backing(), self.opened.settings());
        home.run(move || async move {
            let header = read_header(&file, file_end).await?;
            init_state(id, &file, backing.as_deref(), file_end, header, settings).await
        })
        .wait()
        .map_err(|_| BdevError::ReactorGone)?
    }
}

impl Bdev for Qcow2Bdev {
    fn driver(&self) -> &'static str {
        "qcow2"
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read_only(&self) -> bool {
        self.read_only || self.fenced.load(AtomicOrdering::Acquire)
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let id = self.id;
        let home = self.current_home();
        if home.is_current() {
            let state = image(id).ok_or(BdevError::ReactorGone)?;
            return Ok(Rc::new(Qcow2Channel { state }));
        }
        let resolve = Arc::new(move || -> Result<Rc<dyn Channel>, BdevError> {
            let state = image(id).ok_or(BdevError::ReactorGone)?;
            Ok(Rc::new(Qcow2Channel { state }))
        });
        Ok(Rc::new(ForwardChannel::new(home, resolve)))
    }

    fn info(&self) -> BdevInfo {
        let file = self.file.bdev().info();
        let mut fs = self.format_specific.clone();
        if self.fenced.load(AtomicOrdering::Acquire) {
            fs["data"]["corrupt"] = Value::Bool(true);
        }
        BdevInfo { format_specific: Some(fs), actual_size: file.actual_size, ..file }
    }

    fn home(&self) -> Option<Handle> {
        Some(self.current_home())
    }

    fn rehome(self: Arc<Self>, to: &Handle) -> Result<(), BdevError> {
        let old = self.current_home();
        if old.id() == to.id() {
            return Ok(());
        }
        let id = self.id;
        // Everything cached goes to disk; the state leaves the old home.
        let file_end = old
            .run(move || async move {
                let state = image(id).ok_or(BdevError::ReactorGone)?;
                if !state.read_only() && !state.fenced() {
                    state.flush().await.map_err(|source| BdevError::Io { what: "flush".into(), source })?;
                }
                // A write-back queued meanwhile must not run on the old home.
                state.closed.set(true);
                IMAGES.with(|m| m.borrow_mut().remove(&id));
                Ok::<u64, BdevError>(state.file_end())
            })
            .wait()
            .map_err(|_| BdevError::ReactorGone)??;
        match self.load_on(to, file_end) {
            Ok(()) => {
                *self.home.lock().unwrap_or_else(|e| e.into_inner()) = to.clone();
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "opening a qcow2 image on its new home failed; it stays where it was");
                self.load_on(&old, file_end)?;
                Err(e)
            }
        }
    }

    fn supports_backing(&self) -> bool {
        true
    }

    fn supports_compressed_writes(&self) -> bool {
        true
    }

    fn change_backing(
        &self,
        backing: Option<&Arc<Node>>,
        name: Option<&str>,
        format: Option<&str>,
    ) -> Result<(), BdevError> {
        if self.read_only {
            return Err(BdevError::ReadOnly {
                name: self.file.name().to_string(),
                what: "changing the backing file".into(),
            });
        }
        let id = self.id;
        let new = backing.cloned();
        let (name, format) = (name.map(str::to_string), format.map(str::to_string));
        self.current_home()
            .run(move || async move {
                let state = image(id).ok_or(BdevError::ReactorGone)?;
                let backing = match &new {
                    Some(b) => Some(Backing { ch: b.channel()?, size: b.size() }),
                    None => None,
                };
                state.set_backing(backing, name.as_deref(), format.as_deref()).await.map_err(|source| BdevError::Io {
                    what: "writing the new backing file name into the qcow2 header".into(),
                    source,
                })
            })
            .wait()
            .map_err(|_| BdevError::ReactorGone)??;
        *self.backing.lock().unwrap_or_else(|e| e.into_inner()) = backing.cloned();
        Ok(())
    }

    fn attach_backing(&self, backing: Option<&Arc<Node>>) -> Result<(), BdevError> {
        let id = self.id;
        let new = backing.cloned();
        self.current_home()
            .run(move || async move {
                let state = image(id).ok_or(BdevError::ReactorGone)?;
                let backing = match &new {
                    Some(b) => Some(Backing { ch: b.channel()?, size: b.size() }),
                    None => None,
                };
                state.attach_backing(backing);
                Ok::<(), BdevError>(())
            })
            .wait()
            .map_err(|_| BdevError::ReactorGone)??;
        *self.backing.lock().unwrap_or_else(|e| e.into_inner()) = backing.cloned();
        Ok(())
    }

    fn close(self: Arc<Self>) -> LocalBoxFuture<Result<(), IoError>> {
        let id = self.id;
        Box::pin(async move {
            let Some(state) = image(id) else { return Ok(()) };
            // A fenced image keeps what it has on disk: its cached metadata
            // may hold what the corruption put there.
            let res = if state.read_only() || state.fenced() { Ok(()) } else { state.flush().await };
            state.closed.set(true);
            IMAGES.with(|m| m.borrow_mut().remove(&id));
            res
        })
    }
}

struct Qcow2Channel {
    state: Rc<Qcow2>,
}

impl Channel for Qcow2Channel {
    fn submit(&self, io: Io, done: Done) {
        self.state.submit(io, done);
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        Box::pin(Rc::clone(&self.state).block_status(offset, len))
    }
}
