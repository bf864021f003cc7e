//! A small blocking NBD client for the tests: fixed newstyle handshake with
//! `NBD_OPT_EXPORT_NAME`, simple replies only, requests pipelined by the
//! caller (send several, then read the replies in whatever order they come).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const HANDSHAKE_FIXED_NEWSTYLE: u16 = 1;
const HANDSHAKE_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command flag: the write is durable when acknowledged.
pub const FLAG_FUA: u16 = 1;

/// Transmission flags the server may advertise.
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// One reply: the handle it answers, the NBD error (0 = success) and, for a
/// successful read, the data.
#[derive(Debug)]
pub struct Reply {
    pub handle: u64,
    pub error: u32,
    pub data: Option<Vec<u8>>,
}

pub struct NbdClient {
    sock: UnixStream,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags of the export.
    pub flags: u16,
    /// Reads in flight: handle → length, to know how much data follows a reply.
    reads: HashMap<u64, usize>,
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b.try_into().unwrap())
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}
fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}
fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl NbdClient {
    /// Connects to a Unix socket and selects `export`.
    pub fn connect(path: &Path, export: &str) -> io::Result<NbdClient> {
        let mut sock = UnixStream::connect(path)?;
        let mut greeting = [0u8; 18];
        sock.read_exact(&mut greeting)?;
        if be_u64(&greeting[0..8]) != NBDMAGIC || be_u64(&greeting[8..16]) != IHAVEOPT {
            return Err(bad(format!("not a newstyle NBD server: {greeting:02x?}")));
        }
        let hflags = be_u16(&greeting[16..18]);
        if hflags & HANDSHAKE_FIXED_NEWSTYLE == 0 {
            return Err(bad("server is not fixed newstyle".into()));
        }
        let no_zeroes = hflags & HANDSHAKE_NO_ZEROES != 0;
        let client_flags = u32::from(HANDSHAKE_FIXED_NEWSTYLE) | if no_zeroes { 2 } else { 0 };
        let mut msg = client_flags.to_be_bytes().to_vec();
        msg.extend(IHAVEOPT.to_be_bytes());
        msg.extend(OPT_EXPORT_NAME.to_be_bytes());
        msg.extend((export.len() as u32).to_be_bytes());
        msg.extend(export.as_bytes());
        sock.write_all(&msg)?;
        let mut reply = [0u8; 10];
        sock.read_exact(&mut reply)?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            sock.read_exact(&mut zeroes)?;
        }
        Ok(NbdClient { sock, size: be_u64(&reply[0..8]), flags: be_u16(&reply[8..10]), reads: HashMap::new() })
    }

    fn header(flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&handle.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        h
    }

    pub fn send_write(&mut self, handle: u64, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { FLAG_FUA } else { 0 };
        let mut msg = Self::header(flags, CMD_WRITE, handle, offset, data.len() as u32).to_vec();
        msg.extend_from_slice(data);
        self.sock.write_all(&msg)
    }

    pub fn send_write_zeroes(&mut self, handle: u64, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.sock.write_all(&Self::header(flags, CMD_WRITE_ZEROES, handle, offset, len))
    }

    pub fn send_flush(&mut self, handle: u64) -> io::Result<()> {
        self.sock.write_all(&Self::header(0, CMD_FLUSH, handle, 0, 0))
    }

    pub fn send_read(&mut self, handle: u64, offset: u64, len: u32) -> io::Result<()> {
        self.reads.insert(handle, len as usize);
        self.sock.write_all(&Self::header(0, CMD_READ, handle, offset, len))
    }

    /// Reads the next reply (and a read's data).
    pub fn recv_reply(&mut self) -> io::Result<Reply> {
        let mut h = [0u8; 16];
        self.sock.read_exact(&mut h)?;
        if be_u32(&h[0..4]) != SIMPLE_REPLY_MAGIC {
            return Err(bad(format!("bad reply magic: {h:02x?}")));
        }
        let error = be_u32(&h[4..8]);
        let handle = be_u64(&h[8..16]);
        let mut data = None;
        if let Some(len) = self.reads.remove(&handle)
            && error == 0
        {
            let mut buf = vec![0u8; len];
            self.sock.read_exact(&mut buf)?;
            data = Some(buf);
        }
        Ok(Reply { handle, error, data })
    }

    /// A read with nothing else in flight.
    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        self.send_read(u64::MAX, offset, len)?;
        let r = self.recv_reply()?;
        match (r.error, r.data) {
            (0, Some(d)) => Ok(d),
            (e, _) => Err(io::Error::other(format!("NBD read error {e}"))),
        }
    }

    /// Sends `NBD_CMD_DISC` and closes the connection.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.sock.write_all(&Self::header(0, CMD_DISC, 0, 0, 0))?;
        self.sock.shutdown(std::net::Shutdown::Both)
    }

    /// Sets a timeout on socket reads (None: block).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(t)
    }
}
