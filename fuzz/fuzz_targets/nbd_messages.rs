//! The NBD codec: every handshake and transmission decoder, and the
//! request decoder fed the input in pieces (the first byte sets the piece
//! size and whether extended headers are on).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::handshake::{InfoRequest, MetaContextRequest, OptionReply, OptionRequest, parse_export_name};
use nbd::transmission::{BlockStatusFilter, ReplyHeader, RequestDecoder, decode_chunk};

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let extended = ctl & 1 != 0;
    let piece = usize::from(ctl >> 1).max(1);
    let _ = OptionRequest::decode(rest, 4096);
    let _ = parse_export_name(rest);
    let _ = InfoRequest::parse(rest);
    let _ = MetaContextRequest::parse(rest);
    let _ = BlockStatusFilter::parse(rest);
    if let Ok(Some((reply, _))) = OptionReply::decode(rest, 4096) {
        let _ = reply.parse();
    }
    if let Ok(Some((header, used))) = ReplyHeader::decode(rest, extended, 1 << 20)
        && let ReplyHeader::Chunk(h) = &header
    {
        let _ = decode_chunk(h, &rest[used..]);
    }
    let mut dec = RequestDecoder::new(extended);
    for chunk in rest.chunks(piece) {
        dec.push(chunk);
        loop {
            match dec.next() {
                Ok(Some(req)) if req.payload_len(extended) > 0 => {
                    let _ = dec.take_payload(1 << 16);
                    dec.discard_payload();
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
});
