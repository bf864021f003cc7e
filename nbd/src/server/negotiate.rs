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
/// Largest request payload served, and the maximum block size advertised.
pub const PAYLOAD_BYTES_MAX: u32 = consts::DEFAULT_MAX_PAYLOAD_BYTES;

/// A metadata context an export offers. They are answered in this order
/// (the derived one): `base:allocation`, `qemu:allocation-depth`, then the
/// export's bitmaps in the order the export lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Context {
    BaseAllocation,
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` of the export's bitmap at this index.
    Bitmap(usize),
}

impl Context {
    /// The id the client knows it by.
    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => 1,
            Context::AllocationDepth => 2,
            // Bounded by the bitmaps of one export, far below 2^32.
            Context::Bitmap(i) => 3 + i as u32,
        }
    }

    pub fn name(self, export: &Export) -> String {
        match self {
            Context::BaseAllocation => consts::BASE_ALLOCATION.to_string(),
            Context::AllocationDepth => consts::ALLOCATION_DEPTH.to_string(),
            Context::Bitmap(i) => export.bitmaps[i].context_name(),
        }
    }
}

/// What an export offers, as negotiation sees it.
struct Offer<'a> {
    allocation_depth: bool,
    /// Bitmap names, in the export's order.
    bitmaps: Vec<&'a str>,
}

impl<'a> Offer<'a> {
    fn of(export: &'a Export) -> Offer<'a> {
        Offer {
            allocation_depth: export.allocation_depth,
            bitmaps: export.bitmaps.iter().map(|b| b.bitmap().name().unwrap_or_default()).collect(),
        }
    }

    fn depth(&self) -> Option<Context> {
        self.allocation_depth.then_some(Context::AllocationDepth)
    }

    fn bitmaps(&self) -> impl Iterator<Item = Context> + use<> {
        (0..self.bitmaps.len()).map(Context::Bitmap)
    }

    /// Every context offered.
    fn all(&self) -> Vec<Context> {
        std::iter::once(Context::BaseAllocation).chain(self.depth()).chain(self.bitmaps()).collect()
    }

    /// The contexts one query names. A query with an empty leaf (`base:`,
    /// `qemu:`, `qemu:dirty-bitmap:`) names every context under it, but
    /// only when listing: selecting takes full names. Unknown namespaces
    /// and names select nothing; a name two bitmaps share selects the
    /// first.
    fn query(&self, q: &str, list: bool) -> Vec<Context> {
        if let Some(leaf) = q.strip_prefix("base:") {
            return match leaf {
                "" if list => vec![Context::BaseAllocation],
                "allocation" => vec![Context::BaseAllocation],
                _ => Vec::new(),
            };
        }
        let Some(leaf) = q.strip_prefix(consts::QEMU_NAMESPACE) else {
            return Vec::new();
        };
        if leaf.is_empty() {
            return if list { self.depth().into_iter().chain(self.bitmaps()).collect() } else { Vec::new() };
        }
        if leaf == "allocation-depth" {
            return self.depth().into_iter().collect();
        }
        match leaf.strip_prefix("dirty-bitmap:") {
            Some("") if list => self.bitmaps().collect(),
            Some("") | None => Vec::new(),
            Some(name) => self.bitmaps.iter().position(|&b| b == name).map(Context::Bitmap).into_iter().collect(),
        }
    }

    /// The contexts a `LIST_META_CONTEXT` (`list`) or `SET_META_CONTEXT`
    /// request names, in answer order; listing with no query names them
    /// all.
    fn select(&self, queries: &[String], list: bool) -> Vec<Context> {
        let mut picked: Vec<Context> = if list && queries.is_empty() {
            self.all()
        } else {
            queries.iter().flat_map(|q| self.query(q, list)).collect()
        };
        picked.sort_unstable();
        picked.dedup();
        picked
    }
}

/// What the handshake settled.
pub struct Session {
    pub export: Arc<Export>,
    pub structured: bool,
    /// The metadata contexts selected for this export, in answer order.
    pub contexts: Vec<Context>,
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
    // The contexts the last SET_META_CONTEXT selected, and for which export.
    let mut meta: Option<(Arc<Export>, Vec<Context>)> = None;
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
                return Ok(Some(session(export, structured, meta, flags)));
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
                    return Ok(Some(session(export, structured, meta, flags)));
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
            opt::SET_META_CONTEXT if !structured => {
                meta = None;
                encode_error(h.code, rep::ERR_INVALID, "negotiate structured replies first", &mut out)?
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = h.code == opt::SET_META_CONTEXT;
                if set {
                    // A new selection replaces the old one, even if it fails.
                    meta = None;
                }
                let req = match MetaContextRequest::parse(&data) {
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
                let picked = Offer::of(&export).select(&req.queries, !set);
                for &c in &picked {
                    // Ids mean nothing in a list.
                    let id = if set { c.id() } else { 0 };
                    MetaContext { id, name: c.name(&export) }.encode(h.code, &mut out)?;
                }
                encode_ack(h.code, &mut out);
                if set {
                    meta = Some((export, picked));
                }
            }
            other => encode_error(other, rep::ERR_UNSUP, "option not supported", &mut out)?,
        }
        sock.send_all(&out).await?;
    }
    Err(NegotiateError::Refused(format!("more than {OPTIONS_MAX} options")))
}

/// The session on `export`; contexts selected for another export (or an
/// export since deleted and added again) do not carry over.
fn session(export: Arc<Export>, structured: bool, meta: Option<(Arc<Export>, Vec<Context>)>, flags: u16) -> Session {
    let contexts = match meta {
        Some((for_export, contexts)) if structured && Arc::ptr_eq(&for_export, &export) => contexts,
        _ => Vec::new(),
    };
    Session { export, structured, contexts, transmission_flags: flags }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer<'a>(bitmaps: &[&'a str], allocation_depth: bool) -> Offer<'a> {
        Offer { allocation_depth, bitmaps: bitmaps.to_vec() }
    }

    fn q(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    use Context::{AllocationDepth as Depth, BaseAllocation as Base, Bitmap};

    #[test]
    fn listing_with_empty_leaves_names_whole_namespaces() {
        let o = offer(&["b0", "b1"], true);
        assert_eq!(o.select(&[], true), [Base, Depth, Bitmap(0), Bitmap(1)]);
        assert_eq!(o.select(&q(&["qemu:"]), true), [Depth, Bitmap(0), Bitmap(1)]);
        assert_eq!(o.select(&q(&["qemu:dirty-bitmap:"]), true), [Bitmap(0), Bitmap(1)]);
        assert_eq!(o.select(&q(&["base:"]), true), [Base]);
        assert_eq!(o.select(&q(&["qemu:dirty-bitmap:b1", "base:allocation", "x:y"]), true), [Base, Bitmap(1)]);
        let plain = offer(&[], false);
        assert_eq!(plain.select(&q(&["qemu:"]), true), []);
        assert_eq!(plain.select(&q(&["qemu:allocation-depth"]), true), [], "not offered");
        assert_eq!(plain.select(&[], true), [Base]);
    }

    #[test]
    fn selecting_takes_full_names_only() {
        let o = offer(&["b0", "b0", "b1"], true);
        assert_eq!(o.select(&[], false), []);
        assert_eq!(o.select(&q(&["qemu:", "qemu:dirty-bitmap:", "base:"]), false), []);
        assert_eq!(
            o.select(
                &q(&["qemu:dirty-bitmap:b1", "qemu:allocation-depth", "base:allocation", "base:allocation"]),
                false
            ),
            [Base, Depth, Bitmap(2)],
            "answer order, no duplicates"
        );
        assert_eq!(o.select(&q(&["qemu:dirty-bitmap:b0"]), false), [Bitmap(0)], "the first of a shared name");
        assert_eq!(o.select(&q(&["qemu:dirty-bitmap:nope", "qemu:bogus", "base:bogus"]), false), []);
        assert_eq!([Base.id(), Depth.id(), Bitmap(0).id(), Bitmap(4).id()], [1, 2, 3, 7]);
    }
}
