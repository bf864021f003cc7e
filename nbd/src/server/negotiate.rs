//! The fixed newstyle handshake, server side: greeting, client flags, then
//! options until the client picks an export (`GO` or `EXPORT_NAME`) or
//! leaves (`ABORT`).

use std::sync::Arc;

use crate::consts::{self, handshake_flags, info, opt, rep, transmission_flags as tf};
use crate::handshake::{
    BlockSize, ClientFlags, ExportInfo, Greeting, InfoReply, InfoRequest, MetaContext, MetaContextRequest,
    OptionHeader, ServerEntry, encode_ack, encode_error, encode_export_name_reply, parse_export_name,
};
use crate::sock::Sock;

use super::{Export, Exports};

/// Options longer than this are not even read past: the client is dropped.
const OPTION_SKIP_BYTES_MAX: u64 = 1 << 20;
/// Options one handshake may send before the client is dropped.
const OPTIONS_MAX: usize = 1024;
/// The id of the one metadata context served.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Largest request payload served, and the maximum block size advertised.
pub const PAYLOAD_BYTES_MAX: u32 = consts::DEFAULT_MAX_PAYLOAD_BYTES;

/// What the handshake settled.
pub struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    pub transmission_flags: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] crate::ProtoError),
    #[error("{0}")]
    Refused(String),
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f =
        tf::HAS_FLAGS | tf::SEND_FLUSH | tf::SEND_FUA | tf::SEND_TRIM | tf::SEND_WRITE_ZEROES | tf::SEND_FAST_ZERO;
    // Flushes reach the node, whichever connection wrote: safe for several connections.
    f |= tf::CAN_MULTI_CONN;
    if structured {
        // Reads are never split into several chunks.
        f |= tf::SEND_DF;
    }
    if !export.writable {
        f |= tf::READ_ONLY;
    }
    f
}

fn block_size(export: &Export) -> BlockSize {
    let min = export.backend.root().bdev().block_size().max(1);
    BlockSize { min, preferred: min.max(4096), max: PAYLOAD_BYTES_MAX }
}

/// Runs the handshake; Ok(None) when the client aborted.
pub async fn negotiate(sock: &mut Sock, exports: &Exports) -> Result<Option<Session>, NegotiateError> {
    let offered = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    sock.send_all(&Greeting { handshake_flags: offered }.encode()).await?;
    let raw = sock.read_exact(consts::CLIENT_FLAGS_BYTES).await?;
    let client = ClientFlags::decode(raw.as_slice().try_into().expect("4 bytes"), offered)?;
    if !client.fixed_newstyle() {
        return Err(NegotiateError::Refused("client does not speak fixed newstyle".into()));
    }
    let mut structured = false;
    // Export the client selected base:allocation for, if any.
    let mut meta_for: Option<String> = None;
    for _ in 0..OPTIONS_MAX {
        let raw = sock.read_exact(consts::OPTION_HEADER_BYTES).await?;
        let h = OptionHeader::decode(raw.as_slice().try_into().expect("16 bytes"))?;
        let mut out = Vec::new();
        if h.len as usize > consts::OPTION_BYTES_MAX {
            if u64::from(h.len) > OPTION_SKIP_BYTES_MAX {
                return Err(NegotiateError::Refused(format!("option of {} bytes", h.len)));
            }
            sock.skip(u64::from(h.len)).await?;
            encode_error(h.code, rep::ERR_TOO_BIG, "option too long", &mut out)?;
            sock.send_all(&out).await?;
            continue;
        }
        let data = sock.read_exact(h.len as usize).await?;
        match h.code {
            opt::EXPORT_NAME => {
                let name = parse_export_name(&data)?;
                // No error reply exists for EXPORT_NAME: an unknown name ends the connection.
                let Some(export) = exports.lookup(&name) else {
                    return Err(NegotiateError::Refused(format!("unknown export '{name}'")));
                };
                let flags = transmission_flags(&export, structured);
                encode_export_name_reply(
                    ExportInfo { size: export.backend.root().size(), transmission_flags: flags },
                    client.no_zeroes(),
                    &mut out,
                );
                sock.send_all(&out).await?;
                return Ok(Some(session(export, structured, &meta_for, flags)));
            }
            opt::ABORT => {
                encode_ack(h.code, &mut out);
                let _ = sock.send_all(&out).await;
                return Ok(None);
            }
            opt::LIST if !data.is_empty() => encode_error(h.code, rep::ERR_INVALID, "LIST takes no data", &mut out)?,
            opt::LIST => {
                for e in exports.all() {
                    let entry =
                        ServerEntry { name: e.name.clone(), description: e.description.clone().unwrap_or_default() };
                    let mut payload = Vec::new();
                    entry.encode(&mut payload)?;
                    crate::handshake::encode_reply(h.code, rep::SERVER, &payload, &mut out)?;
                }
                encode_ack(h.code, &mut out);
            }
            opt::INFO | opt::GO => {
                let req = match InfoRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        encode_error(h.code, rep::ERR_INVALID, &e.to_string(), &mut out)?;
                        sock.send_all(&out).await?;
                        continue;
                    }
                };
                let Some(export) = exports.lookup(&req.name) else {
                    encode_error(h.code, rep::ERR_UNKNOWN, &format!("export '{}' not available", req.name), &mut out)?;
                    sock.send_all(&out).await?;
                    continue;
                };
                let flags = transmission_flags(&export, structured);
                InfoReply::Export(ExportInfo { size: export.backend.root().size(), transmission_flags: flags })
                    .encode(h.code, &mut out)?;
                InfoReply::BlockSize(block_size(&export)).encode(h.code, &mut out)?;
                if req.info_types.contains(&info::NAME) {
                    InfoReply::Name(export.name.clone()).encode(h.code, &mut out)?;
                }
                if req.info_types.contains(&info::DESCRIPTION)
                    && let Some(d) = &export.description
                {
                    InfoReply::Description(d.clone()).encode(h.code, &mut out)?;
                }
                encode_ack(h.code, &mut out);
                sock.send_all(&out).await?;
                if h.code == opt::GO {
                    return Ok(Some(session(export, structured, &meta_for, flags)));
                }
                continue;
            }
            opt::STRUCTURED_REPLY if !data.is_empty() => {
                encode_error(h.code, rep::ERR_INVALID, "STRUCTURED_REPLY takes no data", &mut out)?
            }
            opt::STRUCTURED_REPLY => {
                structured = true;
                encode_ack(h.code, &mut out);
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT if !structured => {
                encode_error(h.code, rep::ERR_INVALID, "negotiate structured replies first", &mut out)?
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = h.code == opt::SET_META_CONTEXT;
                let req = match MetaContextRequest::parse(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        encode_error(h.code, rep::ERR_INVALID, &e.to_string(), &mut out)?;
                        sock.send_all(&out).await?;
                        continue;
                    }
                };
                if exports.lookup(&req.name).is_none() {
                    encode_error(h.code, rep::ERR_UNKNOWN, &format!("export '{}' not available", req.name), &mut out)?;
                    sock.send_all(&out).await?;
                    continue;
                }
                let wanted = if set {
                    req.queries.iter().any(|q| q == consts::BASE_ALLOCATION)
                } else {
                    req.queries.is_empty() || req.queries.iter().any(|q| q == consts::BASE_ALLOCATION || q == "base:")
                };
                if set {
                    meta_for = wanted.then(|| req.name.clone());
                }
                if wanted {
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    MetaContext { id, name: consts::BASE_ALLOCATION.to_string() }.encode(h.code, &mut out)?;
                }
                encode_ack(h.code, &mut out);
            }
            other => encode_error(other, rep::ERR_UNSUP, "option not supported", &mut out)?,
        }
        sock.send_all(&out).await?;
    }
    Err(NegotiateError::Refused(format!("more than {OPTIONS_MAX} options")))
}

fn session(export: Arc<Export>, structured: bool, meta_for: &Option<String>, flags: u16) -> Session {
    let base_allocation = structured && meta_for.as_deref().is_some_and(|n| n == export.name || n.is_empty());
    Session { export, structured, base_allocation, transmission_flags: flags }
}
