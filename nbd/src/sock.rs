//! Socket I/O on the current reactor's io_uring, for connection tasks:
//! buffered receives for headers, receives straight into an I/O buffer for
//! payloads, and sends of whole messages.

use std::io;
use std::rc::Rc;

use reactor::{IoBuf, Op, Ring, SharedFd};

/// Bytes received from a socket at once.
pub const RECV_CHUNK_BYTES: usize = 64 << 10;

/// A connected socket with a receive buffer.
pub struct Sock {
    fd: SharedFd,
    ring: Rc<Ring>,
    /// Received bytes not yet consumed: `rbuf[rstart..rend]`.
    rbuf: Option<IoBuf>,
    rstart: usize,
    rend: usize,
}

fn result(res: i32) -> io::Result<usize> {
    if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) }
}

/// A [`Sock`] on its way to another reactor.
pub struct SockParts {
    fd: SharedFd,
    rbuf: Option<IoBuf>,
    rstart: usize,
    rend: usize,
}

impl Sock {
    /// Must be created on the reactor that will use it.
    pub fn new(fd: SharedFd) -> Sock {
        Sock { fd, ring: Rc::clone(reactor::current().ring()), rbuf: None, rstart: 0, rend: 0 }
    }

    pub fn fd(&self) -> &SharedFd {
        &self.fd
    }

    /// Takes the socket apart to move it to another reactor: the fd and
    /// the bytes received but not consumed yet.
    pub fn into_parts(self) -> SockParts {
        SockParts { fd: self.fd, rbuf: self.rbuf, rstart: self.rstart, rend: self.rend }
    }

    /// Rebuilds a socket on the current reactor.
    pub fn from_parts(p: SockParts) -> Sock {
        Sock { fd: p.fd, ring: Rc::clone(reactor::current().ring()), rbuf: p.rbuf, rstart: p.rstart, rend: p.rend }
    }

    /// Bytes received and not consumed yet.
    pub fn buffered(&self) -> &[u8] {
        match &self.rbuf {
            Some(b) => &b[self.rstart..self.rend],
            None => &[],
        }
    }

    /// Marks `n` buffered bytes consumed.
    pub fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.rend - self.rstart);
        self.rstart += n;
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        }
    }

    /// Receives more bytes into the buffer; Ok(0) at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        // The buffer is allocated on first use: a socket that only sends needs none.
        let mut buf = self.rbuf.take().unwrap_or_else(|| IoBuf::new(RECV_CHUNK_BYTES));
        if self.rstart > 0 {
            buf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let at = self.rend;
        let len = buf.capacity() - at;
        if len == 0 {
            self.rbuf = Some(buf);
            return Err(io::Error::other("receive buffer full"));
        }
        let (res, op) = self.ring.submit(Op::Recv { fd: self.fd.clone(), buf, at, len }).await;
        self.rbuf = op.into_buf();
        let n = result(res)?;
        self.rend += n;
        Ok(n)
    }

    /// Exactly `n` bytes (handshake messages), waiting for them.
    pub async fn read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        if n > RECV_CHUNK_BYTES {
            return self.read_large(n).await;
        }
        while self.rend - self.rstart < n {
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        let out = self.buffered()[..n].to_vec();
        self.consume(n);
        Ok(out)
    }

    async fn read_large(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if self.rstart == self.rend && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = (n - out.len()).min(self.rend - self.rstart);
            out.extend_from_slice(&self.buffered()[..take]);
            self.consume(take);
        }
        Ok(out)
    }

    /// Drops `n` bytes of input (an option too large to keep).
    pub async fn skip(&mut self, mut n: u64) -> io::Result<()> {
        while n > 0 {
            if self.rstart == self.rend && self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let take = (n as usize).min(self.rend - self.rstart);
            self.consume(take);
            n -= take as u64;
        }
        Ok(())
    }

    /// Receives into `buf[at..at + len]` directly from the socket (a
    /// payload bypassing the receive buffer); returns the bytes received
    /// (0 at end of stream) and the buffer.
    pub async fn recv_into(&self, buf: IoBuf, at: usize, len: usize) -> (io::Result<usize>, IoBuf) {
        let (res, op) = self.ring.submit(Op::Recv { fd: self.fd.clone(), buf, at, len }).await;
        (result(res), op.into_buf().expect("recv returns its buffer"))
    }

    /// Sends all of `bytes`.
    pub async fn send_all(&self, bytes: &[u8]) -> io::Result<()> {
        let mut buf = IoBuf::from_slice(bytes);
        let mut at = 0;
        while at < bytes.len() {
            let (res, op) = self.ring.submit(Op::Send { fd: self.fd.clone(), buf, at, len: bytes.len() - at }).await;
            buf = op.into_buf().expect("send returns its buffer");
            match result(res)? {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n => at += n,
            }
        }
        Ok(())
    }

    /// Sends slices of several buffers in order (one `writev` each time
    /// the kernel takes them all); returns the buffers.
    pub async fn send_vectored(
        &self,
        mut bufs: Vec<IoBuf>,
        mut segs: Vec<(usize, usize, usize)>,
    ) -> (io::Result<()>, Vec<IoBuf>) {
        let mut iov = Vec::with_capacity(segs.len());
        while !segs.is_empty() {
            let batch: Vec<_> = segs.iter().copied().take(reactor::IOV_MAX).collect();
            let (res, op) = self.ring.submit(Op::Writev { fd: self.fd.clone(), bufs, segs: batch, iov }).await;
            let Op::Writev { bufs: b, segs: sent_segs, iov: i, .. } = op else {
                unreachable!("writev returns a writev")
            };
            bufs = b;
            iov = i;
            let mut n = match result(res) {
                Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), bufs),
                Ok(n) => n,
                Err(e) => return (Err(e), bufs),
            };
            // Drop what went out; a short write leaves the rest of a segment.
            let mut done = 0;
            for &(b, start, len) in &sent_segs {
                if n >= len {
                    n -= len;
                    done += 1;
                } else {
                    segs[done] = (b, start + n, len - n);
                    break;
                }
            }
            segs.drain(..done);
        }
        (Ok(()), bufs)
    }

    /// Shuts the socket down both ways (wakes pending receives).
    pub fn shutdown(&self) {
        use std::os::fd::AsRawFd;
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}
