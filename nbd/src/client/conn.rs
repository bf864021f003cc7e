//! One NBD client connection on its home reactor: requests pipelined to
//! the server, replies matched by cookie and received straight into the
//! request buffers, everything sent by one writer in vectored batches.
//!
//! A request larger than the server's maximum payload goes out in parts
//! (cookie = slab key × 256 + part); it completes when every part is
//! answered and its write payload has left.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use bdev::{BlockStatus, Done, Io, IoError, IoFlags, IoKind};
use reactor::{IoBuf, LocalNotify, ReplyTx, SharedFd};
use slab::Slab;

use super::handshake::Negotiated;
use crate::consts::{cmd, cmd_flags, errno, state, transmission_flags as tf};
use crate::sock::Sock;
use crate::transmission::{Chunk, ReplyHeader, Request, decode_chunk, decode_offset_data_start};

/// Parts one request may be split into.
const PARTS_MAX: u64 = 255;
/// Requests sent by one vectored write at most.
const SEND_BATCH_MAX: usize = 256;
/// Largest non-data reply chunk accepted.
const CHUNK_BYTES_MAX: u64 = 1 << 20;

/// The I/O error for an NBD error value (one exhaustive mapping).
pub fn io_error(nbd_errno: u32) -> IoError {
    match nbd_errno {
        errno::EPERM => IoError::ReadOnly,
        errno::ENOMEM => IoError::NoMem,
        errno::EINVAL | errno::EOVERFLOW => IoError::Invalid,
        errno::ENOSPC => IoError::NoSpace,
        errno::ENOTSUP => IoError::NotSupported,
        errno::ESHUTDOWN => IoError::Canceled,
        _ => IoError::Io,
    }
}

enum Waiter {
    Io(Done),
    Status(ReplyTx<Result<BlockStatus, IoError>>),
}

struct Req {
    /// The request, with its buffer except while the writer is sending it.
    io: Option<Io>,
    waiter: Option<Waiter>,
    parts_left: u64,
    /// Write payload parts not yet sent.
    sends_left: u64,
    error: Option<IoError>,
    status: Option<BlockStatus>,
    /// FUA the server cannot do: a flush follows the write.
    flush_after: bool,
}

/// A header to send, and the payload part following it (key, start, len).
struct Outgoing {
    header: [u8; 28],
    payload: Option<(usize, usize, usize)>,
}

pub(super) struct ClientConn {
    fd: SharedFd,
    neg: Negotiated,
    pending: RefCell<Slab<Req>>,
    sendq: RefCell<VecDeque<Outgoing>>,
    writer_wake: LocalNotify,
    dead: Cell<bool>,
    /// Called once when the connection dies (to reconnect).
    on_death: RefCell<Option<Box<dyn FnOnce()>>>,
}

impl ClientConn {
    /// Starts the reader and writer tasks for a negotiated socket.
    pub(super) fn start(fd: SharedFd, neg: Negotiated, on_death: Box<dyn FnOnce()>) -> Rc<ClientConn> {
        let conn = Rc::new(ClientConn {
            fd,
            neg,
            pending: RefCell::new(Slab::new()),
            sendq: RefCell::new(VecDeque::new()),
            writer_wake: LocalNotify::new(),
            dead: Cell::new(false),
            on_death: RefCell::new(Some(on_death)),
        });
        reactor::spawn_local(read_loop(Rc::clone(&conn)));
        reactor::spawn_local(write_loop(Rc::clone(&conn)));
        conn
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.get()
    }

    pub(super) fn negotiated(&self) -> &Negotiated {
        &self.neg
    }

    /// Ends the connection: shuts the socket down and fails what is pending.
    pub(super) fn kill(&self) {
        if self.dead.replace(true) {
            return;
        }
        use std::os::fd::AsRawFd;
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        self.writer_wake.notify();
        let keys: Vec<usize> = self.pending.borrow().iter().map(|(k, _)| k).collect();
        for k in keys {
            let finished = {
                let mut p = self.pending.borrow_mut();
                let r = &mut p[k];
                r.error.get_or_insert(IoError::Io);
                r.parts_left = 0;
                r.io.is_some()
            };
            // A request whose buffer is in the writer's hands completes when it comes back.
            if finished {
                self.finish(k);
            }
        }
        self.sendq.borrow_mut().clear();
        if let Some(f) = self.on_death.borrow_mut().take() {
            f();
        }
    }

    fn push(&self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u64, payload: Option<(usize, usize, usize)>) {
        let req = Request { flags, kind, cookie, offset, length: len };
        let header = req.encode_compact().expect("request fields fit the compact header");
        self.sendq.borrow_mut().push_back(Outgoing { header, payload });
        self.writer_wake.notify();
    }

    /// Sends an I/O request; `done` gets it back.
    pub(super) fn submit(&self, mut io: Io, done: Done) {
        let has = |f| self.neg.flags & f != 0;
        // What the server cannot do, done here.
        match io.kind {
            IoKind::Flush if !has(tf::SEND_FLUSH) => return done.complete_later(io, Ok(())),
            IoKind::Discard if !has(tf::SEND_TRIM) => return done.complete_later(io, Ok(())),
            IoKind::WriteZeroes
                if !has(tf::SEND_WRITE_ZEROES)
                    || (io.flags.contains(IoFlags::NO_FALLBACK) && !has(tf::SEND_FAST_ZERO)) =>
            {
                if io.flags.contains(IoFlags::NO_FALLBACK) {
                    return done.complete_later(io, Err(IoError::NotSupported));
                }
                // Zeroes as data.
                io = Io::write(io.offset, IoBuf::zeroed(io.len as usize), io.flags);
            }
            _ => {}
        }
        let fua = io.flags.contains(IoFlags::FUA);
        let flush_after = fua && !has(tf::SEND_FUA) && io.kind != IoKind::Read;
        let mut flags = if fua && has(tf::SEND_FUA) { cmd_flags::FUA } else { 0 };
        let kind = match io.kind {
            IoKind::Read => cmd::READ,
            IoKind::Write => cmd::WRITE,
            IoKind::Flush => cmd::FLUSH,
            IoKind::Discard => cmd::TRIM,
            IoKind::WriteZeroes => {
                if !io.flags.contains(IoFlags::MAY_UNMAP) {
                    flags |= cmd_flags::NO_HOLE;
                }
                if io.flags.contains(IoFlags::NO_FALLBACK) {
                    flags |= cmd_flags::FAST_ZERO;
                }
                cmd::WRITE_ZEROES
            }
        };
        let max = u64::from(self.neg.max_payload).max(1);
        let data = matches!(io.kind, IoKind::Read | IoKind::Write);
        let parts = if io.kind == IoKind::Flush {
            1
        } else {
            io.len.div_ceil(if data { max } else { u64::from(u32::MAX) }).max(1)
        };
        if self.dead.get() || parts > PARTS_MAX {
            let e = if self.dead.get() { IoError::Io } else { IoError::Invalid };
            return done.complete_later(io, Err(e));
        }
        let (offset, len) = (io.offset, io.len);
        let key = self.pending.borrow_mut().insert(Req {
            io: Some(io),
            waiter: Some(Waiter::Io(done)),
            parts_left: parts,
            sends_left: if kind == cmd::WRITE { parts } else { 0 },
            error: None,
            status: None,
            flush_after,
        });
        let step = if data { max } else { u64::from(u32::MAX) };
        for part in 0..parts {
            let cookie = ((key as u64) << 8) | part;
            let (o, l) = if kind == cmd::FLUSH { (0, 0) } else { (offset + part * step, step.min(len - part * step)) };
            let payload = (kind == cmd::WRITE).then_some((key, (part * step) as usize, l as usize));
            self.push(kind, flags, cookie, o, l, payload);
        }
    }

    /// Asks the server what the range at `offset` holds (one extent).
    pub(super) fn block_status(&self, offset: u64, len: u64, tx: ReplyTx<Result<BlockStatus, IoError>>) {
        if self.dead.get() {
            return tx.send(Err(IoError::Io));
        }
        let len = len.min(u64::from(u32::MAX));
        let key = self.pending.borrow_mut().insert(Req {
            // A stand-in without a buffer: the reply carries extents only.
            io: Some(Io::flush()),
            waiter: Some(Waiter::Status(tx)),
            parts_left: 1,
            sends_left: 0,
            error: None,
            status: None,
            flush_after: false,
        });
        self.push(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, (key as u64) << 8, offset, len, None);
    }

    /// Completes request `key` if every part is answered and sent.
    fn finish(&self, key: usize) {
        let ready =
            self.pending.borrow().get(key).is_some_and(|r| r.parts_left == 0 && r.sends_left == 0 && r.io.is_some());
        if !ready {
            return;
        }
        let mut r = self.pending.borrow_mut().remove(key);
        if r.flush_after && r.error.is_none() && !self.dead.get() {
            // FUA emulated: the flush goes out only after the write is done.
            let io = r.io.take().expect("request present");
            let Some(Waiter::Io(done)) = r.waiter.take() else { unreachable!("writes have an I/O waiter") };
            let key = self.pending.borrow_mut().insert(Req {
                io: Some(io),
                waiter: Some(Waiter::Io(done)),
                parts_left: 1,
                sends_left: 0,
                error: None,
                status: None,
                flush_after: false,
            });
            self.push(cmd::FLUSH, 0, (key as u64) << 8, 0, 0, None);
            return;
        }
        match r.waiter.take() {
            Some(Waiter::Io(done)) => {
                let res = r.error.map_or(Ok(()), Err);
                done.complete(r.io.take().expect("request present"), res);
            }
            Some(Waiter::Status(tx)) => tx.send(match (r.error, r.status) {
                (Some(e), _) => Err(e),
                (None, Some(st)) => Ok(st),
                (None, None) => Err(IoError::Io),
            }),
            None => {}
        }
    }

    fn part_done(&self, key: usize, error: Option<IoError>) {
        {
            let mut p = self.pending.borrow_mut();
            let Some(r) = p.get_mut(key) else { return };
            if let Some(e) = error {
                r.error.get_or_insert(e);
            }
            r.parts_left = r.parts_left.saturating_sub(1);
        }
        self.finish(key);
    }
}

fn split_cookie(cookie: u64) -> usize {
    (cookie >> 8) as usize
}

async fn read_loop(conn: Rc<ClientConn>) {
    let mut sock = Sock::new(conn.fd.clone());
    let res = read_replies(&conn, &mut sock).await;
    if let Err(e) = res
        && !conn.dead.get()
    {
        tracing::warn!(error = %e, "NBD client connection lost");
    }
    conn.kill();
}

async fn need(sock: &mut Sock, n: usize) -> Result<(), String> {
    while sock.buffered().len() < n {
        if sock.fill().await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed the connection".into());
        }
    }
    Ok(())
}

/// Receives `len` bytes into request `key`'s buffer at `at`.
async fn recv_data(conn: &ClientConn, sock: &mut Sock, key: usize, at: usize, len: usize) -> Result<(), String> {
    let Some(mut buf) = conn.pending.borrow_mut().get_mut(key).and_then(|r| r.io.as_mut()).and_then(|io| io.buf.take())
    else {
        return Err(format!("data for a request without a buffer (key {key})"));
    };
    if at + len > buf.len() {
        return Err(format!("server sent {len} bytes at {at} for a {}-byte read", buf.len()));
    }
    let n = sock.buffered().len().min(len);
    buf[at..at + n].copy_from_slice(&sock.buffered()[..n]);
    sock.consume(n);
    let mut have = n;
    let mut res = Ok(());
    while have < len {
        let (r, b) = sock.recv_into(buf, at + have, len - have).await;
        buf = b;
        match r {
            Ok(0) => {
                res = Err("the server closed the connection".into());
                break;
            }
            Ok(k) => have += k,
            Err(e) => {
                res = Err(e.to_string());
                break;
            }
        }
    }
    if let Some(io) = conn.pending.borrow_mut().get_mut(key).and_then(|r| r.io.as_mut()) {
        io.buf = Some(buf);
    }
    res
}

async fn read_replies(conn: &ClientConn, sock: &mut Sock) -> Result<(), String> {
    loop {
        let decoded = ReplyHeader::decode(sock.buffered(), false, u64::from(conn.neg.max_payload) + CHUNK_BYTES_MAX)
            .map_err(|e| e.to_string())?;
        let Some((header, used)) = decoded else {
            if sock.fill().await.map_err(|e| e.to_string())? == 0 {
                return Err("the server closed the connection".into());
            }
            continue;
        };
        sock.consume(used);
        let key = split_cookie(header.cookie());
        let (kind, req_offset) =
            match conn.pending.borrow().get(key).and_then(|r| r.io.as_ref().map(|io| (io.kind, io.offset))) {
                Some(v) => v,
                None => return Err(format!("reply for unknown cookie {:#x}", header.cookie())),
            };
        match header {
            ReplyHeader::Simple { error, cookie } => {
                if error == 0 && kind == IoKind::Read {
                    let part = cookie & 0xff;
                    let max = u64::from(conn.neg.max_payload).max(1);
                    let len = conn.pending.borrow()[key].io.as_ref().map_or(0, |io| io.len);
                    let at = part * max;
                    recv_data(conn, sock, key, at as usize, max.min(len - at) as usize).await?;
                }
                conn.part_done(key, (error != 0).then(|| io_error(error)));
            }
            ReplyHeader::Chunk(h) => {
                if h.kind == crate::consts::reply_type::OFFSET_DATA {
                    need(sock, 8).await?;
                    let prefix: [u8; 8] = sock.buffered()[..8].try_into().expect("8 bytes");
                    let (offset, len) = decode_offset_data_start(&h, &prefix).map_err(|e| e.to_string())?;
                    sock.consume(8);
                    let at =
                        offset.checked_sub(req_offset).ok_or_else(|| format!("data at {offset} before the request"))?;
                    recv_data(conn, sock, key, at as usize, len as usize).await?;
                } else {
                    need(sock, h.length as usize).await?;
                    let payload = sock.buffered()[..h.length as usize].to_vec();
                    sock.consume(h.length as usize);
                    match decode_chunk(&h, &payload).map_err(|e| e.to_string())? {
                        Chunk::None | Chunk::OffsetData { .. } => {}
                        Chunk::OffsetHole { offset, size } => {
                            let mut p = conn.pending.borrow_mut();
                            let buf = p.get_mut(key).and_then(|r| r.io.as_mut()).and_then(|io| io.buf.as_mut());
                            let at = offset.checked_sub(req_offset).map(|a| a as usize);
                            match (buf, at) {
                                (Some(b), Some(at)) if at + size as usize <= b.len() => {
                                    b[at..at + size as usize].fill(0)
                                }
                                _ => return Err("hole outside the request".into()),
                            }
                        }
                        Chunk::BlockStatus { extents, .. } => {
                            if let (Some(e), Some(r)) = (extents.first(), conn.pending.borrow_mut().get_mut(key)) {
                                let flags = e.flags as u32;
                                r.status = Some(BlockStatus {
                                    len: e.length,
                                    data: flags & state::HOLE == 0,
                                    zero: flags & state::ZERO != 0,
                                    allocated: true,
                                    depth: 0,
                                    offset: None,
                                    compressed: false,
                                });
                            }
                        }
                        Chunk::Error { error, .. } => {
                            if let Some(r) = conn.pending.borrow_mut().get_mut(key) {
                                r.error.get_or_insert(io_error(error));
                            }
                        }
                    }
                }
                if h.is_done() {
                    conn.part_done(key, None);
                }
            }
        }
    }
}

async fn write_loop(conn: Rc<ClientConn>) {
    let sock = Sock::new(conn.fd.clone());
    let mut headers: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if conn.dead.get() {
            return;
        }
        if conn.sendq.borrow().is_empty() {
            conn.writer_wake.notified().await;
            continue;
        }
        let batch: Vec<Outgoing> = {
            let mut q = conn.sendq.borrow_mut();
            let n = q.len().min(SEND_BATCH_MAX);
            q.drain(..n).collect()
        };
        headers.clear();
        let mut bufs: Vec<IoBuf> = vec![IoBuf::new(0)];
        // Which request each payload buffer belongs to, and how many parts it carries.
        let mut owners: Vec<(usize, u64)> = Vec::new();
        let mut segs = Vec::with_capacity(batch.len() * 2);
        for out in &batch {
            let start = headers.len();
            headers.extend_from_slice(&out.header);
            segs.push((0, start, out.header.len()));
            if let Some((key, at, len)) = out.payload {
                let idx = match owners.iter().position(|(k, _)| *k == key) {
                    Some(i) => {
                        owners[i].1 += 1;
                        i + 1
                    }
                    None => {
                        let buf = conn
                            .pending
                            .borrow_mut()
                            .get_mut(key)
                            .and_then(|r| r.io.as_mut())
                            .and_then(|io| io.buf.take());
                        let Some(buf) = buf else { continue };
                        owners.push((key, 1));
                        bufs.push(buf);
                        bufs.len() - 1
                    }
                };
                segs.push((idx, at, len));
            }
        }
        bufs[0] = IoBuf::from_slice(&headers);
        let (res, mut back) = sock.send_vectored(bufs, segs).await;
        // Payload buffers return to their requests.
        for ((key, parts), buf) in owners.into_iter().zip(back.drain(1..)) {
            if let Some(r) = conn.pending.borrow_mut().get_mut(key) {
                if let Some(io) = r.io.as_mut() {
                    io.buf = Some(buf);
                }
                r.sends_left = r.sends_left.saturating_sub(parts);
            }
            conn.finish(key);
        }
        if let Err(e) = res {
            tracing::warn!(error = %e, "NBD client send failed");
            conn.kill();
            return;
        }
    }
}
