//! `blkdebug`: an error-injection filter in the spirit of QEMU's blkdebug.
//!
//! Requests pass through to the `image` child unchanged, except those an
//! `inject-error` rule matches: they complete with the rule's errno (on the
//! next tick, never inside `submit`) and never reach the child.
//!
//! ```text
//!   request ──▶ rules armed? ──no──▶ image child
//!                   │ yes
//!                   └─▶ first matching rule ──▶ Err(errno)   (once: rule removed)
//! ```
//!
//! The rules of a node are shared by its channels on every reactor (one
//! `Mutex`, taken only while rules exist; with none, a request costs one
//! relaxed atomic load). [`set_rules`] replaces them at run time
//! (`x-blkdebug-set-rules`).
//!
//! Differences from QEMU, where a rule is armed by a driver-internal event
//! (`l2_load`, `cow_write`, ...) and then fails the next request: here an
//! event only says which requests a rule matches. `read_aio`, `write_aio`,
//! `pwritev`, `pwritev_zero`, `flush_to_os` and `flush_to_disk` stand for
//! their request type; every other event matches every request type (as
//! QEMU's `none` event, which arms a rule at once). `iotype` overrides the
//! event. Without states (`set-state` is accepted and ignored) the node
//! stays in QEMU's initial state 1: rules for state 0 ("any") or 1 fire,
//! rules for other states never do. `immediately` has no effect: injected
//! errors always complete on the next reactor tick.

use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use serde_json::{Map, Value, json};

use crate::bdev::{Bdev, BdevInfo, Channel, LocalBoxFuture};
use crate::channel::BlockChannel;
use crate::error::{BdevError, IoError};
use crate::graph::{Node, OpenCtx};
use crate::io::{BlockStatus, Done, Io, IoKind};
use crate::lock::Perms;
use crate::options::OptReader;

/// QEMU's sector: `sector` counts 512-byte units whatever the block size.
const SECTOR_BYTES: u64 = 512;
/// Largest errno a rule may inject (Linux's MAX_ERRNO).
const ERRNO_MAX: i64 = 4095;
/// The state a blkdebug node starts in (QEMU's); 0 in a rule means any state.
const STATE_INITIAL: i64 = 1;

/// What a rule can fail: the request types, plus block-status queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl Target {
    fn of(kind: IoKind) -> Target {
        match kind {
            IoKind::Read => Target::Read,
            IoKind::Write => Target::Write,
            IoKind::WriteZeroes => Target::WriteZeroes,
            IoKind::Discard => Target::Discard,
            IoKind::Flush => Target::Flush,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Targets of a rule that names neither a mapped event nor an `iotype`
/// (QEMU's default: every request type, not block-status).
const TARGETS_ANY: u8 = (1 << Target::Read as u8)
    | (1 << Target::Write as u8)
    | (1 << Target::WriteZeroes as u8)
    | (1 << Target::Discard as u8)
    | (1 << Target::Flush as u8);

/// QEMU's `BlkdebugIOType` values.
const IOTYPES: &[(&str, Target)] = &[
    ("read", Target::Read),
    ("write", Target::Write),
    ("write-zeroes", Target::WriteZeroes),
    ("discard", Target::Discard),
    ("flush", Target::Flush),
    ("block-status", Target::BlockStatus),
];

/// QEMU's `BlkdebugEvent` names, each with the request type it stands for
/// here (`None`: every request type).
const EVENTS: &[(&str, Option<Target>)] = &[
    ("l1_update", None),
    ("l1_grow_alloc_table", None),
    ("l1_grow_write_table", None),
    ("l1_grow_activate_table", None),
    ("l2_load", None),
    ("l2_update", None),
    ("l2_update_compressed", None),
    ("l2_alloc_cow_read", None),
    ("l2_alloc_write", None),
    ("read_aio", Some(Target::Read)),
    ("read_backing_aio", None),
    ("read_compressed", None),
    ("write_aio", Some(Target::Write)),
    ("write_compressed", None),
    ("vmstate_load", None),
    ("vmstate_save", None),
    ("cow_read", None),
    ("cow_write", None),
    ("reftable_load", None),
    ("reftable_grow", None),
    ("reftable_update", None),
    ("refblock_load", None),
    ("refblock_update", None),
    ("refblock_update_part", None),
    ("refblock_alloc", None),
    ("refblock_alloc_hookup", None),
    ("refblock_alloc_write", None),
    ("refblock_alloc_write_blocks", None),
    ("refblock_alloc_write_table", None),
    ("refblock_alloc_switch_table", None),
    ("cluster_alloc", None),
    ("cluster_alloc_bytes", None),
    ("cluster_free", None),
    ("flush_to_os", Some(Target::Flush)),
    ("flush_to_disk", Some(Target::Flush)),
    ("pwritev_rmw_head", None),
    ("pwritev_rmw_after_head", None),
    ("pwritev_rmw_tail", None),
    ("pwritev_rmw_after_tail", None),
    ("pwritev", Some(Target::Write)),
    ("pwritev_zero", Some(Target::WriteZeroes)),
    ("pwritev_done", None),
    ("empty_image_prepare", None),
    ("l1_shrink_write_table", None),
    ("l1_shrink_free_l2_clusters", None),
    ("cor_write", None),
    ("none", None),
];

/// One `inject-error` rule, validated.
#[derive(Debug, Clone, PartialEq)]
struct Rule {
    /// Bit set of [`Target`]s the rule fails.
    targets: u8,
    error: IoError,
    /// A byte the request must cover (`sector * 512`); `None`: any request.
    at: Option<u64>,
    /// Removed after its first hit.
    once: bool,
}

impl Rule {
    fn matches(&self, target: Target, offset: u64, len: u64) -> bool {
        self.targets & target.bit() != 0 && self.at.is_none_or(|at| at >= offset && at - offset < len)
    }
}

/// A node's rules, shared by its channels on every reactor.
#[derive(Debug, Default)]
struct Rules {
    /// Rules exist; false lets requests skip the lock.
    armed: AtomicBool,
    list: Mutex<Vec<Rule>>,
}

impl Rules {
    fn new(list: Vec<Rule>) -> Rules {
        Rules { armed: AtomicBool::new(!list.is_empty()), list: Mutex::new(list) }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Rule>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn replace(&self, rules: Vec<Rule>) {
        let mut list = self.lock();
        *list = rules;
        self.armed.store(!list.is_empty(), Ordering::Relaxed);
    }

    /// The error to inject for a request, if a rule matches it. A relaxed
    /// load suffices: whoever changed the rules reached this reactor
    /// through a message, which orders the change before this request.
    #[inline]
    fn check(&self, target: Target, offset: u64, len: u64) -> Option<IoError> {
        if !self.armed.load(Ordering::Relaxed) {
            return None;
        }
        self.check_locked(target, offset, len)
    }

    #[cold]
    fn check_locked(&self, target: Target, offset: u64, len: u64) -> Option<IoError> {
        let mut list = self.lock();
        let i = list.iter().position(|r| r.matches(target, offset, len))?;
        let error = list[i].error;
        if list[i].once {
            list.remove(i);
            self.armed.store(!list.is_empty(), Ordering::Relaxed);
        }
        Some(error)
    }
}

pub struct BlkdebugBdev {
    image: Arc<Node>,
    read_only: bool,
    rules: Arc<Rules>,
}

/// Live blkdebug devices by address, so [`set_rules`] finds a node's rules
/// without a downcast in the device trait. A `Weak` keeps its allocation,
/// so an address is never reused while its entry exists; the device
/// removes its entry when dropped.
static DEVICES: Mutex<BTreeMap<usize, Weak<BlkdebugBdev>>> = Mutex::new(BTreeMap::new());

fn devices() -> MutexGuard<'static, BTreeMap<usize, Weak<BlkdebugBdev>>> {
    DEVICES.lock().unwrap_or_else(|e| e.into_inner())
}

fn address(bdev: &dyn Bdev) -> usize {
    std::ptr::from_ref(bdev).cast::<()>().addr()
}

impl Drop for BlkdebugBdev {
    fn drop(&mut self) {
        devices().remove(&address(self));
    }
}

pub fn open(ctx: &mut OpenCtx<'_>, mut opts: OptReader) -> Result<Arc<dyn Bdev>, BdevError> {
    let image = opts.take("image").filter(|v| !v.is_null()).ok_or_else(|| opts.missing("image"))?;
    if opts.has("config") {
        return Err(BdevError::Unsupported(
            "blkdebug configuration files ('config') are not supported; give the rules as 'inject-error'".into(),
        ));
    }
    let rules = match opts.take("inject-error") {
        None => Vec::new(),
        Some(v) => parse_rules(v, "inject-error")?,
    };
    // Limits QEMU uses to shape requests, and its state machine: accepted
    // so QEMU configurations open, without effect here.
    for key in ["align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"] {
        opts.u64_opt(key)?;
    }
    for key in ["set-state", "take-child-perms", "unshare-child-perms"] {
        list_opt(&mut opts, key)?;
    }
    opts.finish()?;
    let read_only = ctx.common().read_only;
    let perms = if read_only { Perms::read() } else { Perms::write() };
    let image = ctx.open_child("image", image, perms)?;
    let read_only = read_only || image.read_only();
    let dev = Arc::new(BlkdebugBdev { image, read_only, rules: Arc::new(Rules::new(rules)) });
    devices().insert(address(dev.as_ref()), Arc::downgrade(&dev));
    Ok(dev)
}

/// Replaces the `inject-error` rules of a blkdebug node while it runs;
/// `rules` is a list shaped as `blockdev-add` takes it (an empty list
/// clears). Requests already past the check are not affected.
pub fn set_rules(node: &Node, rules: Value) -> Result<(), BdevError> {
    let address = address(node.bdev().as_ref());
    let dev = devices().get(&address).and_then(Weak::upgrade).ok_or_else(|| {
        BdevError::invalid(format!("Node '{}' is not a blkdebug node (driver '{}')", node.name(), node.driver()))
    })?;
    let rules = parse_rules(rules, "inject-error")?;
    dev.rules.replace(rules);
    Ok(())
}

/// A member that must be a list; its contents are not read.
fn list_opt(opts: &mut OptReader, key: &str) -> Result<(), BdevError> {
    match opts.take(key) {
        None | Some(Value::Array(_)) => Ok(()),
        Some(_) => Err(BdevError::invalid(format!("Invalid parameter type for '{key}', expected: array"))),
    }
}

/// Reads an `inject-error` list; `key` names it in messages.
fn parse_rules(value: Value, key: &str) -> Result<Vec<Rule>, BdevError> {
    let Value::Array(items) = value else {
        return Err(BdevError::invalid(format!("Invalid parameter type for '{key}', expected: array")));
    };
    let mut rules = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        if let Some(rule) = parse_rule(item, &format!("{key}[{i}]"))? {
            rules.push(rule);
        }
    }
    Ok(rules)
}

/// Reads one rule (QEMU's `BlkdebugInjectErrorOptions`); `name` is its
/// path for messages (`inject-error[0]`). `None`: valid, but for a state
/// the node never enters.
fn parse_rule(value: Value, name: &str) -> Result<Option<Rule>, BdevError> {
    // A reader nested under the rule's path, so messages name
    // `inject-error[0].event` as QEMU does.
    let mut outer = OptReader::new(Value::Object(Map::from_iter([(name.to_string(), value)])))?;
    let mut r = outer.object_opt(name)?.ok_or_else(|| outer.missing(name))?;
    let event = r.str_opt("event")?.ok_or_else(|| r.missing("event"))?;
    let Some(&(_, event_target)) = EVENTS.iter().find(|(n, _)| *n == event) else {
        return Err(BdevError::invalid(format!("Parameter '{name}.event' does not accept value '{event}'")));
    };
    let state = int_opt(&mut r, name, "state")?;
    let iotype = r.enum_opt("iotype", &IOTYPES.iter().map(|(n, _)| *n).collect::<Vec<_>>())?;
    let errno = int_opt(&mut r, name, "errno")?.unwrap_or(i64::from(libc::EIO));
    let sector = int_opt(&mut r, name, "sector")?.unwrap_or(-1);
    let once = r.bool_opt("once")?.unwrap_or(false);
    let _immediately = r.bool_opt("immediately")?;
    r.finish()?;
    if !(1..=ERRNO_MAX).contains(&errno) {
        return Err(BdevError::invalid(format!(
            "Parameter '{name}.errno' must be an errno value from 1 to {ERRNO_MAX}, not {errno}"
        )));
    }
    let at = match sector {
        -1 => None,
        s => match u64::try_from(s).ok().and_then(|s| s.checked_mul(SECTOR_BYTES)) {
            Some(at) => Some(at),
            None => {
                return Err(BdevError::invalid(format!(
                    "Parameter '{name}.sector' must be -1 (any) or a sector number, not {s}"
                )));
            }
        },
    };
    let targets = match (iotype, event_target) {
        (Some(t), _) => IOTYPES.iter().find(|(n, _)| *n == t).map_or(0, |(_, t)| t.bit()),
        (None, Some(t)) => t.bit(),
        (None, None) => TARGETS_ANY,
    };
    if state.is_some_and(|s| s != 0 && s != STATE_INITIAL) {
        return Ok(None);
    }
    let error = IoError::from_errno(errno as i32);
    Ok(Some(Rule { targets, error, at, once }))
}

/// A signed integer member (`sector` is -1 for "any").
fn int_opt(r: &mut OptReader, name: &str, key: &str) -> Result<Option<i64>, BdevError> {
    match r.take(key) {
        None => Ok(None),
        Some(Value::Number(n)) if n.is_i64() => Ok(n.as_i64()),
        Some(_) => Err(BdevError::invalid(format!("Invalid parameter type for '{name}.{key}', expected: integer"))),
    }
}

impl Bdev for BlkdebugBdev {
    fn driver(&self) -> &'static str {
        "blkdebug"
    }

    fn is_filter(&self) -> bool {
        true
    }

    fn size(&self) -> u64 {
        self.image.size()
    }

    fn block_size(&self) -> u32 {
        self.image.bdev().block_size()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn create_channel(self: Arc<Self>) -> Result<Rc<dyn Channel>, BdevError> {
        let image = self.image.channel()?;
        Ok(Rc::new(BlkdebugChannel { image, rules: Arc::clone(&self.rules) }))
    }

    fn home(&self) -> Option<reactor::Handle> {
        self.image.home()
    }

    fn info(&self) -> BdevInfo {
        let child = self.image.bdev().info();
        // QEMU's names: `blkdebug::FILE`, or a JSON description when the
        // child has no file name of its own.
        let filename = match child.filename.strip_prefix("json:") {
            None => format!("blkdebug::{}", child.filename),
            Some(desc) => {
                let image = serde_json::from_str(desc).unwrap_or_else(|_| Value::String(desc.to_string()));
                format!("json:{}", json!({"driver": "blkdebug", "image": image}))
            }
        };
        BdevInfo { filename, format_specific: None, ..child }
    }
}

struct BlkdebugChannel {
    image: BlockChannel,
    rules: Arc<Rules>,
}

impl Channel for BlkdebugChannel {
    fn submit(&self, io: Io, done: Done) {
        if let Some(e) = self.rules.check(Target::of(io.kind), io.offset, io.len) {
            return done.complete_later(io, Err(e));
        }
        self.image.raw().submit(io, done);
    }

    fn block_status(&self, offset: u64, len: u64) -> LocalBoxFuture<Result<BlockStatus, IoError>> {
        let injected = self.rules.check(Target::BlockStatus, offset, len);
        let image = self.image.clone();
        Box::pin(async move {
            match injected {
                Some(e) => Err(e),
                None => image.block_status(offset, len).await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(v: Value) -> Result<Vec<Rule>, String> {
        parse_rules(v, "inject-error").map_err(|e| e.to_string())
    }

    fn one(v: Value) -> Rule {
        let mut r = rules(json!([v])).unwrap();
        assert_eq!(r.len(), 1);
        r.remove(0)
    }

    #[test]
    fn events_name_their_request_type_and_iotype_overrides() {
        let bit = Target::bit;
        assert_eq!(one(json!({"event": "read_aio"})).targets, bit(Target::Read));
        assert_eq!(one(json!({"event": "write_aio"})).targets, bit(Target::Write));
        assert_eq!(one(json!({"event": "pwritev_zero"})).targets, bit(Target::WriteZeroes));
        assert_eq!(one(json!({"event": "flush_to_disk"})).targets, bit(Target::Flush));
        assert_eq!(one(json!({"event": "l2_load"})).targets, TARGETS_ANY);
        assert_eq!(one(json!({"event": "read_aio", "iotype": "discard"})).targets, bit(Target::Discard));
        assert_eq!(one(json!({"event": "none", "iotype": "block-status"})).targets, bit(Target::BlockStatus));
    }

    #[test]
    fn defaults_match_qemu() {
        let r = one(json!({"event": "none"}));
        assert_eq!(r, Rule { targets: TARGETS_ANY, error: IoError::Io, at: None, once: false });
        let r = one(json!({"event": "none", "errno": 28, "sector": 8, "once": true, "immediately": true, "state": 1}));
        assert_eq!(r, Rule { targets: TARGETS_ANY, error: IoError::NoSpace, at: Some(4096), once: true });
        assert_eq!(r.error.errno(), libc::ENOSPC);
        // Rules for states the node never enters are dropped.
        assert!(rules(json!([{"event": "none", "state": 2}])).unwrap().is_empty());
        assert_eq!(rules(json!([{"event": "none", "state": 0}])).unwrap().len(), 1);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(
            rules(json!([{"event": "read_aio"}, {"event": "bogus"}])).unwrap_err(),
            "Parameter 'inject-error[1].event' does not accept value 'bogus'"
        );
        assert_eq!(rules(json!([{}])).unwrap_err(), "Parameter 'inject-error[0].event' is missing");
        assert_eq!(
            rules(json!([{"event": "none", "iotype": "trim"}])).unwrap_err(),
            "Parameter 'inject-error[0].iotype' does not accept value 'trim'"
        );
        assert_eq!(
            rules(json!([{"event": "none", "errno": "EIO"}])).unwrap_err(),
            "Invalid parameter type for 'inject-error[0].errno', expected: integer"
        );
        assert!(rules(json!([{"event": "none", "errno": 0}])).unwrap_err().contains("errno value from 1"));
        assert!(rules(json!([{"event": "none", "sector": -2}])).unwrap_err().contains("sector"));
        assert_eq!(
            rules(json!([{"event": "none", "bogus": 1}])).unwrap_err(),
            "Parameter 'inject-error[0].bogus' is unexpected"
        );
        assert_eq!(
            rules(json!(["read_aio"])).unwrap_err(),
            "Invalid parameter type for 'inject-error[0]', expected: object"
        );
        assert_eq!(rules(json!({})).unwrap_err(), "Invalid parameter type for 'inject-error', expected: array");
    }

    #[test]
    fn sector_rules_match_requests_covering_the_byte() {
        let r = one(json!({"event": "read_aio", "sector": 8}));
        assert!(r.matches(Target::Read, 4096, 512));
        assert!(r.matches(Target::Read, 0, 4097));
        assert!(!r.matches(Target::Read, 0, 4096));
        assert!(!r.matches(Target::Read, 4097, 512));
        assert!(!r.matches(Target::Write, 4096, 512));
        // A flush covers no byte.
        let f = one(json!({"event": "flush_to_disk", "sector": 0}));
        assert!(!f.matches(Target::Flush, 0, 0));
    }

    #[test]
    fn once_rules_disarm_after_their_hit() {
        let rules = Rules::new(vec![one(json!({"event": "read_aio", "once": true, "errno": 28}))]);
        assert_eq!(rules.check(Target::Write, 0, 512), None);
        assert_eq!(rules.check(Target::Read, 0, 512), Some(IoError::NoSpace));
        assert!(!rules.armed.load(Ordering::Relaxed));
        assert_eq!(rules.check(Target::Read, 0, 512), None);
        rules.replace(vec![one(json!({"event": "read_aio"}))]);
        assert_eq!(rules.check(Target::Read, 0, 512), Some(IoError::Io));
        assert_eq!(rules.check(Target::Read, 0, 512), Some(IoError::Io));
        rules.replace(Vec::new());
        assert_eq!(rules.check(Target::Read, 0, 512), None);
    }
}
