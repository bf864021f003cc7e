//! The client side of the handshake, on a blocking socket with timeouts:
//! it runs at open time on the control thread and, after a lost
//! connection, on a short-lived reconnect thread — never on a reactor.
//! The connected socket then moves to the node's home reactor.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::consts::{self, handshake_flags, info, opt, rep, transmission_flags as tf};
use crate::handshake::{
    ClientFlags, Greeting, InfoReply, InfoRequest, MetaContextRequest, OptionReply, OptionRequest, ReplyData,
    decode_export_name_reply,
};

/// Each handshake step must finish within this.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// What the server granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub max_payload: u32,
    pub structured: bool,
    /// The id of `base:allocation`, when the server serves it.
    pub base_allocation: Option<u32>,
}

impl Negotiated {
    pub fn read_only(&self) -> bool {
        self.flags & tf::READ_ONLY != 0
    }

    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

fn err(msg: impl Into<String>) -> String {
    msg.into()
}

fn read_exact(s: &mut dyn Stream, n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).map_err(|e| err(format!("reading from the server: {e}")))?;
    Ok(buf)
}

fn send(s: &mut dyn Stream, req: &OptionRequest) -> Result<(), String> {
    let mut out = Vec::new();
    req.encode(&mut out).map_err(|e| err(e.to_string()))?;
    s.write_all(&out).map_err(|e| err(format!("writing to the server: {e}")))
}

fn reply(s: &mut dyn Stream) -> Result<OptionReply, String> {
    let head = read_exact(s, consts::OPTION_REPLY_HEADER_BYTES)?;
    let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes")) as usize;
    if len > consts::REPLY_BYTES_MAX {
        return Err(err(format!("server sent an option reply of {len} bytes")));
    }
    let mut all = head;
    all.extend(read_exact(s, len)?);
    match OptionReply::decode(&all, consts::REPLY_BYTES_MAX) {
        Ok(Some((r, _))) => Ok(r),
        Ok(None) => Err(err("truncated option reply")),
        Err(e) => Err(err(format!("bad option reply: {e}"))),
    }
}

/// Connects (once) to `target`.
fn connect(target: &Target) -> Result<(Box<dyn Stream>, OwnedFd), String> {
    match target {
        Target::Tcp { host, port } => {
            let addrs: Vec<SocketAddr> =
                (host.as_str(), *port).to_socket_addrs().map_err(|e| err(format!("{host}: {e}")))?.collect();
            let mut last = String::from("no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, STEP_TIMEOUT) {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        s.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
                        s.set_write_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
                        let fd = s.try_clone().map_err(|e| e.to_string())?.into();
                        return Ok((Box::new(s), fd));
                    }
                    Err(e) => last = format!("{a}: {e}"),
                }
            }
            Err(last)
        }
        Target::Unix(p) => {
            let s = UnixStream::connect(p).map_err(|e| err(format!("{}: {e}", p.display())))?;
            s.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
            let fd = s.try_clone().map_err(|e| e.to_string())?.into();
            Ok((Box::new(s), fd))
        }
    }
}

/// Connects and negotiates export `name`; returns the socket, ready for
/// the transmission phase (switched back to blocking mode without
/// timeouts; the reactor only uses io_uring on it).
pub fn connect_and_negotiate(target: &Target, name: &str) -> Result<(OwnedFd, Negotiated), String> {
    let (mut s, fd) = connect(target)?;
    let s: &mut dyn Stream = &mut *s;
    let g = read_exact(s, consts::GREETING_BYTES)?;
    let greeting = Greeting::decode(g.as_slice().try_into().expect("greeting size")).map_err(|e| err(e.to_string()))?;
    if greeting.handshake_flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(err("server does not speak fixed newstyle NBD"));
    }
    let client = ClientFlags::negotiate(greeting.handshake_flags);
    s.write_all(&client.encode()).map_err(|e| err(e.to_string()))?;

    let mut structured = false;
    send(s, &OptionRequest::new(opt::STRUCTURED_REPLY))?;
    match reply(s)?.parse().map_err(|e| err(e.to_string()))? {
        ReplyData::Ack => structured = true,
        ReplyData::Error { .. } => {}
        other => return Err(err(format!("unexpected reply to STRUCTURED_REPLY: {other:?}"))),
    }
    let mut base_allocation = None;
    if structured {
        let req = MetaContextRequest { name: name.to_string(), queries: vec![consts::BASE_ALLOCATION.to_string()] };
        send(s, &req.to_option(opt::SET_META_CONTEXT).map_err(|e| err(e.to_string()))?)?;
        loop {
            match reply(s)?.parse().map_err(|e| err(e.to_string()))? {
                ReplyData::MetaContext(m) if m.name == consts::BASE_ALLOCATION => base_allocation = Some(m.id),
                ReplyData::MetaContext(_) => {}
                ReplyData::Ack | ReplyData::Error { .. } => break,
                other => return Err(err(format!("unexpected reply to SET_META_CONTEXT: {other:?}"))),
            }
        }
    }
    let go = InfoRequest { name: name.to_string(), info_types: vec![info::BLOCK_SIZE] };
    send(s, &go.to_option(opt::GO).map_err(|e| err(e.to_string()))?)?;
    let (mut size, mut flags, mut min_block, mut max_payload) = (None, 0u16, 1u32, consts::DEFAULT_MAX_PAYLOAD_BYTES);
    loop {
        let r = reply(s)?;
        match r.parse().map_err(|e| err(e.to_string()))? {
            ReplyData::Info(InfoReply::Export(e)) => {
                size = Some(e.size);
                flags = e.transmission_flags;
            }
            ReplyData::Info(InfoReply::BlockSize(b)) => {
                min_block = b.min.max(1);
                max_payload = b.max.min(consts::DEFAULT_MAX_PAYLOAD_BYTES);
            }
            ReplyData::Info(_) => {}
            ReplyData::Ack => break,
            ReplyData::Error { reply_type, .. } if reply_type == rep::ERR_UNSUP => {
                // An old server: fall back to EXPORT_NAME (no error reply; it closes on an unknown name).
                send(s, &OptionRequest::export_name(name).map_err(|e| err(e.to_string()))?)?;
                let mut buf = Vec::new();
                let no_zeroes = client.no_zeroes();
                let want =
                    consts::EXPORT_NAME_REPLY_BYTES + if no_zeroes { 0 } else { consts::EXPORT_NAME_ZEROES_BYTES };
                buf.extend(read_exact(s, want)?);
                let (e, _) = decode_export_name_reply(&buf, no_zeroes)
                    .map_err(|e| err(e.to_string()))?
                    .ok_or_else(|| err("truncated EXPORT_NAME reply"))?;
                size = Some(e.size);
                flags = e.transmission_flags;
                // Structured replies need GO; meta contexts too.
                structured = false;
                base_allocation = None;
                break;
            }
            ReplyData::Error { message, .. } => return Err(err(format!("export '{name}': {message}"))),
            other => return Err(err(format!("unexpected reply to GO: {other:?}"))),
        }
    }
    let size = size.ok_or_else(|| err("server did not report the export size"))?;
    Ok((fd, Negotiated { size, flags, min_block, max_payload, structured, base_allocation }))
}
