use super::*;
use crate::consts::{errno, state};
use proptest::prelude::*;

const COOKIE: u64 = 0x0102_0304_0506_0708;

fn target(extended: bool) -> ReplyTarget {
    ReplyTarget { cookie: COOKIE, offset: 0x200, extended }
}

/// Structured chunk header bytes for COOKIE.
fn sr(flags: u16, kind: u16, len: u32) -> Vec<u8> {
    let mut v = vec![0x66, 0x8e, 0x33, 0xef];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&COOKIE.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v
}

/// Decodes one whole chunk (header + payload) from `wire`.
fn decode_one(wire: &[u8], extended: bool) -> Result<(ChunkHeader, Chunk<'_>)> {
    let (h, used) = ReplyHeader::decode(wire, extended, 1 << 20)?.expect("whole header");
    let ReplyHeader::Chunk(h) = h else { panic!("not a chunk") };
    Ok((h, decode_chunk(&h, &wire[used..])?))
}

#[test]
fn compact_request_bytes() {
    let req = Request { flags: cmd_flags::FUA, kind: cmd::READ, cookie: COOKIE, offset: 0x1000, length: 0x200 };
    let want: [u8; 28] =
        [0x25, 0x60, 0x95, 0x13, 0, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 2, 0];
    assert_eq!(req.encode_compact(), Ok(want));
    assert_eq!(Request::decode_compact(&want), Ok(req));
    let mut out = Vec::new();
    req.encode(false, &mut out).unwrap();
    assert_eq!(out, want);
    let big = Request { length: 1 << 32, ..req };
    assert!(matches!(big.encode_compact(), Err(ProtoError::LengthTooLarge { .. })));
    assert!(big.encode(false, &mut out).is_err());
}

#[test]
fn extended_request_bytes() {
    let req = Request { flags: cmd_flags::PAYLOAD_LEN, kind: cmd::WRITE, cookie: 9, offset: 0, length: 4 };
    let want: [u8; 32] =
        [0x21, 0xe4, 0x1c, 0x71, 0, 0x20, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4];
    assert_eq!(req.encode_extended(), want);
    assert_eq!(Request::decode_extended(&want), Ok(req));
    let wide = Request { kind: cmd::TRIM, flags: 0, length: 1 << 40, ..req };
    assert_eq!(Request::decode_extended(&wide.encode_extended()), Ok(wide));
}

#[test]
fn request_bad_magic() {
    let mut b = Request::default().encode_compact().unwrap();
    b[3] = 0x14;
    assert_eq!(
        Request::decode_compact(&b),
        Err(ProtoError::BadMagic { what: "request", expected: 0x2560_9513, got: 0x2560_9514 })
    );
    // A compact header where an extended one is expected.
    let mut e = [0u8; 32];
    e[..28].copy_from_slice(&Request::default().encode_compact().unwrap());
    assert!(matches!(Request::decode_extended(&e), Err(ProtoError::BadMagic { what: "extended request", .. })));
}

#[test]
fn payload_len_by_style() {
    let w = Request { kind: cmd::WRITE, length: 100, ..Request::default() };
    assert_eq!(w.payload_len(false), 100);
    assert_eq!(w.payload_len(true), 0);
    let wp = Request { flags: cmd_flags::PAYLOAD_LEN, ..w };
    assert_eq!(wp.payload_len(true), 100);
    let r = Request { kind: cmd::READ, length: 100, ..Request::default() };
    assert_eq!(r.payload_len(false), 0);
    // PAYLOAD_LEN means nothing on compact headers.
    let rp = Request { flags: cmd_flags::PAYLOAD_LEN, ..r };
    assert_eq!(rp.payload_len(false), 0);
    assert_eq!(rp.payload_len(true), 100);
}

#[test]
fn validation() {
    use transmission_flags as tf;
    let all = tf::HAS_FLAGS | tf::SEND_FUA | tf::SEND_DF | tf::SEND_FAST_ZERO | tf::BLOCK_STATUS_PAYLOAD;
    let req = |kind, flags| Request { kind, flags, ..Request::default() };

    assert_eq!(req(9, 0).check_command(), Err(ProtoError::UnknownCommand(9)));
    assert_eq!(req(9, 0).check_flags(false, all), Err(ProtoError::UnknownCommand(9)));
    assert_eq!(allowed_flags(9, true, all), None);
    assert_eq!(req(cmd::RESIZE, 0).check_command(), Ok(()));

    assert_eq!(req(cmd::READ, cmd_flags::FUA | cmd_flags::DF).check_flags(false, all), Ok(()));
    assert_eq!(
        req(cmd::READ, cmd_flags::DF).check_flags(false, tf::HAS_FLAGS),
        Err(ProtoError::BadFlags { command: cmd::READ, flags: cmd_flags::DF, invalid: cmd_flags::DF })
    );
    assert_eq!(
        req(cmd::WRITE, cmd_flags::FUA).check_flags(false, tf::HAS_FLAGS),
        Err(ProtoError::BadFlags { command: cmd::WRITE, flags: 1, invalid: 1 })
    );
    assert_eq!(
        req(cmd::FLUSH, cmd_flags::NO_HOLE).check_flags(false, all),
        Err(ProtoError::BadFlags { command: cmd::FLUSH, flags: 2, invalid: 2 })
    );
    assert_eq!(req(cmd::WRITE_ZEROES, cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO).check_flags(false, all), Ok(()));
    assert!(req(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO).check_flags(false, tf::HAS_FLAGS).is_err());
    assert_eq!(req(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE).check_flags(false, 0), Ok(()));
    assert!(req(cmd::READ, 0x8000).check_flags(false, all).is_err());

    // PAYLOAD_LEN: only extended, only write and (if advertised) block status.
    assert!(req(cmd::WRITE, cmd_flags::PAYLOAD_LEN).check_flags(false, all).is_err());
    assert_eq!(req(cmd::WRITE, cmd_flags::PAYLOAD_LEN).check_flags(true, all), Ok(()));
    assert_eq!(req(cmd::WRITE, 0).check_flags(true, all), Err(ProtoError::MissingPayloadLen { command: cmd::WRITE }));
    assert_eq!(req(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN).check_flags(true, all), Ok(()));
    assert!(req(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN).check_flags(true, tf::HAS_FLAGS).is_err());
    assert!(req(cmd::READ, cmd_flags::PAYLOAD_LEN).check_flags(true, all).is_err());

    // Lengths and ranges.
    let r = Request { kind: cmd::WRITE, offset: u64::MAX - 1, length: 2, ..Request::default() };
    assert_eq!(r.end(), Err(ProtoError::OffsetOverflow { offset: u64::MAX - 1, length: 2 }));
    assert_eq!(r.check_bounds(u64::MAX), Err(ProtoError::OffsetOverflow { offset: u64::MAX - 1, length: 2 }));
    let r = Request { kind: cmd::READ, offset: 4096, length: 512, ..Request::default() };
    assert_eq!(r.end(), Ok(4608));
    assert_eq!(r.check_bounds(4608), Ok(()));
    assert_eq!(r.check_bounds(4607), Err(ProtoError::OutOfBounds { offset: 4096, length: 512, size: 4607 }));
    assert_eq!(r.check_length(512), Ok(()));
    assert_eq!(r.check_length(511), Err(ProtoError::LengthTooLarge { what: "request length", len: 512, max: 511 }));
    assert_eq!(r.check_payload(false, 0), Ok(()));
    let w = Request { kind: cmd::WRITE, length: 1 << 26, ..Request::default() };
    assert!(matches!(w.check_payload(false, 1 << 25), Err(ProtoError::LengthTooLarge { what: "request payload", .. })));

    // validate: payload size first, then command, flags, overflow.
    let limits = RequestLimits { extended: false, transmission_flags: all, max_payload: 1 << 25 };
    let bad_both = Request { flags: cmd_flags::DF, ..w };
    assert!(matches!(bad_both.validate(&limits), Err(ProtoError::LengthTooLarge { .. })));
    assert_eq!(req(42, 0).validate(&limits), Err(ProtoError::UnknownCommand(42)));
    assert!(matches!(req(cmd::TRIM, cmd_flags::DF).validate(&limits), Err(ProtoError::BadFlags { .. })));
    let over = Request { kind: cmd::TRIM, offset: u64::MAX, length: 1, ..Request::default() };
    assert!(matches!(over.validate(&limits), Err(ProtoError::OffsetOverflow { .. })));
    assert_eq!(Request { kind: cmd::WRITE, length: 4096, ..Request::default() }.validate(&limits), Ok(()));
}

fn stream(reqs: &[(Request, Vec<u8>)], extended: bool) -> Vec<u8> {
    let mut wire = Vec::new();
    for (r, payload) in reqs {
        r.encode(extended, &mut wire).unwrap();
        wire.extend_from_slice(payload);
    }
    wire
}

fn sample(extended: bool) -> Vec<(Request, Vec<u8>)> {
    let pl = if extended { cmd_flags::PAYLOAD_LEN } else { 0 };
    vec![
        (Request { kind: cmd::READ, cookie: 1, offset: 0, length: 4096, flags: 0 }, vec![]),
        (
            Request { kind: cmd::WRITE, cookie: 2, offset: 512, length: 5, flags: pl | cmd_flags::FUA },
            b"hello".to_vec(),
        ),
        (Request { kind: cmd::WRITE, cookie: 3, offset: 0, length: 0, flags: pl }, vec![]),
        (Request { kind: cmd::FLUSH, cookie: 4, offset: 0, length: 0, flags: 0 }, vec![]),
        (Request { kind: cmd::WRITE, cookie: 5, offset: 7, length: 3, flags: pl }, vec![1, 2, 3]),
        (Request { kind: cmd::DISC, cookie: 6, offset: 0, length: 0, flags: 0 }, vec![]),
    ]
}

/// Feeds `wire` in `step`-byte pieces and collects requests and payloads.
fn run_decoder(wire: &[u8], extended: bool, step: usize) -> Vec<(Request, Vec<u8>)> {
    let mut d = RequestDecoder::new(extended);
    assert_eq!(d.extended(), extended);
    let mut got: Vec<(Request, Vec<u8>)> = Vec::new();
    for piece in wire.chunks(step) {
        d.push(piece);
        loop {
            if d.payload_pending() > 0 {
                let p = d.take_payload(usize::MAX);
                got.last_mut().unwrap().1.extend_from_slice(&p);
                if d.payload_pending() > 0 {
                    break;
                }
            }
            match d.next().unwrap() {
                Some(r) => got.push((r, Vec::new())),
                None => break,
            }
        }
    }
    assert_eq!(d.buffered(), 0);
    assert_eq!(d.payload_pending(), 0);
    got
}

#[test]
fn decoder_one_byte_at_a_time() {
    for extended in [false, true] {
        let reqs = sample(extended);
        let wire = stream(&reqs, extended);
        for step in [1, 2, 3, 7, 29, wire.len()] {
            assert_eq!(run_decoder(&wire, extended, step), reqs, "extended={extended} step={step}");
        }
    }
}

#[test]
fn decoder_payload_read_directly() {
    let reqs = sample(false);
    let wire = stream(&reqs[..3], false);
    // Push the READ, the WRITE header and 2 of its 5 payload bytes.
    let cut = 28 + 28 + 2;
    let mut d = RequestDecoder::new(false);
    d.push(&wire[..cut]);
    assert_eq!(d.next().unwrap(), Some(reqs[0].0));
    let w = d.next().unwrap().unwrap();
    assert_eq!(w, reqs[1].0);
    assert_eq!(d.payload_pending(), 5);
    assert_eq!(d.next(), Err(ProtoError::PayloadPending { remaining: 5 }));
    assert_eq!(d.buffered_payload(), b"he");
    // Copy what is buffered into the I/O buffer, read the rest "directly".
    let mut io = [0u8; 5];
    assert_eq!(d.copy_payload(&mut io[..1]), 1);
    assert_eq!(d.copy_payload(&mut io[1..]), 1);
    assert_eq!(d.copy_payload(&mut io[2..]), 0);
    io[2..].copy_from_slice(&wire[cut..cut + 3]);
    // Only the 3 unbuffered bytes may be reported.
    assert!(matches!(d.payload_read_directly(4), Err(ProtoError::LengthTooLarge { len: 4, max: 3, .. })));
    assert_eq!(d.payload_read_directly(3), Ok(()));
    assert_eq!(&io, b"hello");
    assert_eq!(d.next(), Ok(None));
    d.push(&wire[cut + 3..]);
    assert_eq!(d.next().unwrap(), Some(reqs[2].0));
    assert_eq!(d.next(), Ok(None));
}

#[test]
fn decoder_payload_read_directly_when_buffer_has_more() {
    // Header, payload and the next header arrive together: nothing may be
    // "read directly" since the payload is all buffered.
    let reqs = sample(false);
    let wire = stream(&reqs[1..4], false);
    let mut d = RequestDecoder::new(false);
    d.push(&wire);
    assert_eq!(d.next().unwrap(), Some(reqs[1].0));
    assert!(d.payload_read_directly(1).is_err());
    assert_eq!(d.take_payload(2), b"he");
    assert_eq!(d.take_payload(100), b"llo");
    assert_eq!(d.take_payload(100), b"");
    assert_eq!(d.next().unwrap(), Some(reqs[2].0));
    assert_eq!(d.next().unwrap(), Some(reqs[3].0));
}

#[test]
fn decoder_discards_rejected_payload_across_pushes() {
    let reqs = sample(true);
    let wire = stream(&reqs, true);
    let mut d = RequestDecoder::new(true);
    // READ header + WRITE header + 1 payload byte.
    d.push(&wire[..32 + 32 + 1]);
    assert_eq!(d.next().unwrap(), Some(reqs[0].0));
    assert_eq!(d.next().unwrap(), Some(reqs[1].0));
    d.discard_payload();
    assert_eq!(d.payload_pending(), 4);
    assert_eq!(d.buffered(), 0);
    // The rest arrives in pieces; the 4 payload bytes vanish.
    d.push(&wire[65..67]);
    assert_eq!(d.payload_pending(), 2);
    assert_eq!(d.buffered(), 0);
    d.push(&wire[67..]);
    assert_eq!(d.payload_pending(), 0);
    assert_eq!(d.next().unwrap(), Some(reqs[2].0));
    assert_eq!(d.next().unwrap(), Some(reqs[3].0));
    assert_eq!(d.next().unwrap(), Some(reqs[4].0));
    // The last write's payload is still pending.
    assert_eq!(d.next(), Err(ProtoError::PayloadPending { remaining: 3 }));
}

#[test]
fn decoder_bad_magic_fails_fast() {
    let mut d = RequestDecoder::new(false);
    d.push(&[0x25, 0x60, 0x95]);
    assert_eq!(d.next(), Ok(None));
    d.push(&[0x12]);
    assert_eq!(d.next(), Err(ProtoError::BadMagic { what: "request", expected: 0x2560_9513, got: 0x2560_9512 }));
    // Compact headers on an extended connection.
    let mut d = RequestDecoder::new(true);
    d.push(&Request::default().encode_compact().unwrap());
    assert!(matches!(d.next(), Err(ProtoError::BadMagic { what: "extended request", .. })));
}

#[test]
fn simple_reply_bytes() {
    let b = encode_simple_reply(errno::EIO, 0xaa);
    assert_eq!(b, [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0xaa]);
    assert_eq!(ReplyHeader::decode(&b, false, 0), Ok(Some((ReplyHeader::Simple { error: 5, cookie: 0xaa }, 16))));
    assert_eq!(ReplyHeader::decode(&b[..15], false, 0), Ok(None));
    assert_eq!(ReplyHeader::Simple { error: 0, cookie: 3 }.cookie(), 3);
    // Not allowed with extended headers.
    assert!(matches!(ReplyHeader::decode(&b, true, 0), Err(ProtoError::BadMagic { what: "extended reply", .. })));
}

#[test]
fn none_chunk_bytes() {
    let mut out = Vec::new();
    encode_none(target(false), &mut out).unwrap();
    assert_eq!(out, sr(1, 0, 0));
    let (h, c) = decode_one(&out, false).unwrap();
    assert!(h.is_done());
    assert_eq!(c, Chunk::None);
    assert_eq!(ReplyHeader::Chunk(h).cookie(), COOKIE);

    let mut out = Vec::new();
    encode_none(target(true), &mut out).unwrap();
    let mut want = vec![0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 0];
    want.extend_from_slice(&COOKIE.to_be_bytes());
    want.extend_from_slice(&0x200u64.to_be_bytes());
    want.extend_from_slice(&0u64.to_be_bytes());
    assert_eq!(out, want);
    let (h, c) = decode_one(&out, true).unwrap();
    assert_eq!((h.offset, c), (0x200, Chunk::None));
}

#[test]
fn offset_data_bytes() {
    let mut out = Vec::new();
    encode_offset_data_header(target(false), 0, 0x200, 3, &mut out).unwrap();
    let mut want = sr(0, 1, 11);
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0]);
    assert_eq!(out, want);
    out.extend_from_slice(b"abc");
    let (h, c) = decode_one(&out, false).unwrap();
    assert_eq!(c, Chunk::OffsetData { offset: 0x200, data: b"abc" });
    assert_eq!(decode_offset_data_start(&h, &[0, 0, 0, 0, 0, 0, 2, 0]), Ok((0x200, 3)));
    // Too long for a structured header, fine for an extended one.
    assert!(encode_offset_data_header(target(false), 0, 0, 1 << 32, &mut Vec::new()).is_err());
    assert!(encode_offset_data_header(target(true), 0, 0, 1 << 32, &mut Vec::new()).is_ok());
    assert!(encode_offset_data_header(target(true), 0, 0, u64::MAX, &mut Vec::new()).is_err());
    // Length below 9.
    let h = ChunkHeader { kind: reply_type::OFFSET_DATA, length: 8, ..ChunkHeader::default() };
    assert_eq!(decode_chunk(&h, &[0; 8]), Err(ProtoError::BadChunkLength { kind: 1, len: 8 }));
    assert_eq!(decode_offset_data_start(&h, &[0; 8]), Err(ProtoError::BadChunkLength { kind: 1, len: 8 }));
}

#[test]
fn offset_hole_bytes() {
    let mut out = Vec::new();
    encode_offset_hole(target(false), reply_flags::DONE, 0x200, 4096, &mut out).unwrap();
    let mut want = sr(1, 2, 12);
    want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x10, 0]);
    assert_eq!(out, want);
    assert_eq!(decode_one(&out, false).unwrap().1, Chunk::OffsetHole { offset: 0x200, size: 4096 });
    let h = ChunkHeader { kind: reply_type::OFFSET_HOLE, length: 12, ..ChunkHeader::default() };
    assert_eq!(decode_chunk(&h, &[0; 12]), Err(ProtoError::ZeroLength { what: "hole size" }));
    let h = ChunkHeader { length: 13, ..h };
    assert_eq!(decode_chunk(&h, &[0; 13]), Err(ProtoError::BadChunkLength { kind: 2, len: 13 }));
}

#[test]
fn block_status_bytes() {
    let extents =
        [Extent { length: 4096, flags: u64::from(state::HOLE | state::ZERO) }, Extent { length: 512, flags: 0 }];
    let mut out = Vec::new();
    encode_block_status(target(false), reply_flags::DONE, 1, &extents, &mut out).unwrap();
    let mut want = sr(1, 5, 20);
    want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0x10, 0, 0, 0, 0, 3, 0, 0, 2, 0, 0, 0, 0, 0]);
    assert_eq!(out, want);
    assert_eq!(decode_one(&out, false).unwrap().1, Chunk::BlockStatus { context_id: 1, extents: extents.to_vec() });

    let mut out = Vec::new();
    encode_block_status(target(true), reply_flags::DONE, 1, &extents[..1], &mut out).unwrap();
    let mut want = vec![0x6e, 0x8a, 0x27, 0x8c, 0, 1, 0, 6];
    want.extend_from_slice(&COOKIE.to_be_bytes());
    want.extend_from_slice(&0x200u64.to_be_bytes());
    want.extend_from_slice(&24u64.to_be_bytes());
    want.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 3]);
    assert_eq!(out, want);
    assert_eq!(decode_one(&out, true).unwrap().1, Chunk::BlockStatus { context_id: 1, extents: extents[..1].to_vec() });

    // 64-bit extents do not fit the compact form.
    let wide = [Extent { length: 1 << 32, flags: 0 }];
    assert!(encode_block_status(target(false), 0, 1, &wide, &mut Vec::new()).is_err());
    assert!(encode_block_status(target(true), 0, 1, &wide, &mut Vec::new()).is_ok());
}

#[test]
fn block_status_decode_errors() {
    let h = |kind, length| ChunkHeader { kind, length, ..ChunkHeader::default() };
    // No descriptor / partial descriptor.
    assert!(matches!(decode_chunk(&h(5, 4), &[0; 4]), Err(ProtoError::BadChunkLength { .. })));
    assert!(matches!(decode_chunk(&h(5, 16), &[0; 16]), Err(ProtoError::BadChunkLength { .. })));
    // Zero-length extent.
    let p = [0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0];
    assert_eq!(decode_chunk(&h(5, 12), &p), Err(ProtoError::ZeroLength { what: "block status extent length" }));
    // Extended: count disagrees.
    let mut p = vec![0, 0, 0, 1, 0, 0, 0, 2];
    p.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        decode_chunk(&h(6, 24), &p),
        Err(ProtoError::CountMismatch { what: "block status descriptors", declared: 2, found: 1 })
    );
    assert!(matches!(decode_chunk(&h(6, 8), &p[..8]), Err(ProtoError::BadChunkLength { .. })));
    assert!(matches!(decode_chunk(&h(6, 20), &p[..20]), Err(ProtoError::BadChunkLength { .. })));
}

#[test]
fn error_chunk_bytes() {
    let mut out = Vec::new();
    encode_error_chunk(target(false), reply_flags::DONE, errno::EIO, "bad", &mut out).unwrap();
    let mut want = sr(1, 0x8001, 9);
    want.extend_from_slice(&[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
    assert_eq!(out, want);
    assert_eq!(
        decode_one(&out, false).unwrap().1,
        Chunk::Error { kind: reply_type::ERROR, error: 5, message: "bad".into(), offset: None }
    );

    let mut out = Vec::new();
    encode_error_offset_chunk(target(false), 0, errno::EINVAL, "", 0x400, &mut out).unwrap();
    let mut want = sr(0, 0x8002, 14);
    want.extend_from_slice(&[0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 0, 4, 0]);
    assert_eq!(out, want);
    assert_eq!(
        decode_one(&out, false).unwrap().1,
        Chunk::Error { kind: reply_type::ERROR_OFFSET, error: 22, message: String::new(), offset: Some(0x400) }
    );
    let mut out = Vec::new();
    encode_error_offset_chunk(target(true), 0, errno::EINVAL, "x", 0x400, &mut out).unwrap();
    assert_eq!(out.len(), 32 + 15);
    assert!(matches!(decode_one(&out, true).unwrap().1, Chunk::Error { offset: Some(0x400), .. }));

    assert!(encode_error_chunk(target(false), 0, 5, &"m".repeat(4097), &mut Vec::new()).is_err());
}

#[test]
fn error_chunk_decode_errors() {
    let h = |kind, length| ChunkHeader { kind, length, ..ChunkHeader::default() };
    // Message longer than the chunk.
    assert!(matches!(decode_chunk(&h(0x8001, 7), &[0, 0, 0, 5, 0, 2, b'a']), Err(ProtoError::ShortPayload { .. })));
    // Trailing bytes after an ERROR's message.
    assert!(matches!(
        decode_chunk(&h(0x8001, 8), &[0, 0, 0, 5, 0, 1, b'a', 0]),
        Err(ProtoError::TrailingBytes { extra: 1, .. })
    ));
    // ERROR_OFFSET missing its offset.
    assert!(matches!(decode_chunk(&h(0x8002, 6), &[0, 0, 0, 5, 0, 0]), Err(ProtoError::ShortPayload { .. })));
    // Error value 0.
    assert_eq!(decode_chunk(&h(0x8001, 6), &[0; 6]), Err(ProtoError::ZeroErrorValue));
    // Unknown error type: generic fields parsed, extra fields ignored.
    assert_eq!(
        decode_chunk(&h(0x8007, 9), &[0, 0, 0, 5, 0, 1, b'z', 0xee, 0xee]),
        Ok(Chunk::Error { kind: 0x8007, error: 5, message: "z".into(), offset: None })
    );
    // Overlong message.
    let mut p = vec![0, 0, 0, 5, 0x10, 0x01];
    p.extend(std::iter::repeat_n(b'm', 4097));
    assert!(matches!(decode_chunk(&h(0x8001, p.len() as u64), &p), Err(ProtoError::StringTooLong { len: 4097, .. })));
}

#[test]
fn chunk_decode_errors() {
    let h = ChunkHeader { kind: reply_type::NONE, length: 0, ..ChunkHeader::default() };
    assert_eq!(decode_chunk(&h, &[]), Err(ProtoError::NoneWithoutDone));
    let h = ChunkHeader { flags: reply_flags::DONE, length: 1, ..h };
    assert_eq!(decode_chunk(&h, &[0]), Err(ProtoError::BadChunkLength { kind: 0, len: 1 }));
    assert!(matches!(decode_chunk(&h, &[]), Err(ProtoError::ShortPayload { need: 1, got: 0, .. })));
    assert!(matches!(decode_chunk(&h, &[0, 0]), Err(ProtoError::TrailingBytes { extra: 1, .. })));
    let h = ChunkHeader { kind: 3, length: 0, ..h };
    assert_eq!(decode_chunk(&h, &[]), Err(ProtoError::UnknownChunkType(3)));
}

#[test]
fn reply_header_errors() {
    let big = sr(0, 1, 100);
    assert_eq!(
        ReplyHeader::decode(&big, false, 99),
        Err(ProtoError::LengthTooLarge { what: "reply chunk", len: 100, max: 99 })
    );
    assert!(ReplyHeader::decode(&big, false, 100).unwrap().is_some());
    assert_eq!(ReplyHeader::decode(&big[..19], false, 100), Ok(None));
    assert_eq!(ReplyHeader::decode(&big[..3], false, 100), Ok(None));
    assert!(matches!(ReplyHeader::decode(&big, true, 100), Err(ProtoError::BadMagic { what: "extended reply", .. })));
    let mut ext = Vec::new();
    encode_none(target(true), &mut ext).unwrap();
    assert_eq!(ReplyHeader::decode(&ext[..31], true, 0), Ok(None));
    assert!(matches!(
        ReplyHeader::decode(&ext, false, 100),
        Err(ProtoError::BadMagic { what: "simple or structured reply", .. })
    ));
    let wide = ChunkHeader { kind: 1, length: 1 << 33, ..ChunkHeader::default() };
    assert!(wide.encode_structured().is_err());
    assert!(matches!(
        ReplyHeader::decode(&wide.encode_extended(), true, 1 << 32),
        Err(ProtoError::LengthTooLarge { .. })
    ));
}

#[test]
fn block_status_filter() {
    let f = BlockStatusFilter { effect_length: 1 << 40, context_ids: vec![1, 7] };
    let p = f.encode();
    assert_eq!(p, [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 7]);
    assert_eq!(BlockStatusFilter::parse(&p), Ok(f));
    assert!(matches!(BlockStatusFilter::parse(&p[..15]), Err(ProtoError::TrailingBytes { extra: 3, .. })));
    assert!(matches!(BlockStatusFilter::parse(&p[..7]), Err(ProtoError::ShortPayload { .. })));
}

#[test]
fn generic_chunk_round_trip() {
    let mut out = Vec::new();
    encode_chunk(target(true), 0, 0x8009, &[0, 0, 0, 1, 0, 0], &mut out).unwrap();
    let (h, c) = decode_one(&out, true).unwrap();
    assert_eq!((h.kind, h.length, h.offset), (0x8009, 6, 0x200));
    assert!(matches!(c, Chunk::Error { kind: 0x8009, error: 1, .. }));
}

fn arb_request() -> impl Strategy<Value = Request> {
    (any::<u16>(), any::<u16>(), any::<u64>(), any::<u64>(), any::<u64>())
        .prop_map(|(flags, kind, cookie, offset, length)| Request { flags, kind, cookie, offset, length })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn request_round_trips(req in arb_request()) {
        prop_assert_eq!(Request::decode_extended(&req.encode_extended()), Ok(req));
        let compact = Request { length: req.length & 0xffff_ffff, ..req };
        prop_assert_eq!(Request::decode_compact(&compact.encode_compact().unwrap()), Ok(compact));
        let _ = req.validate(&RequestLimits { extended: req.cookie & 1 == 0, transmission_flags: req.flags, max_payload: req.offset });
        let _ = req.check_bounds(req.cookie);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), extended: bool, kind: u16, flags: u16, max in any::<u64>()) {
        if let Some(a) = bytes.first_chunk::<REQUEST_HEADER_BYTES>() {
            let _ = Request::decode_compact(a);
        }
        if let Some(a) = bytes.first_chunk::<EXTENDED_REQUEST_HEADER_BYTES>() {
            let _ = Request::decode_extended(a);
        }
        let _ = ReplyHeader::decode(&bytes, extended, max);
        // With a valid magic so the rest of each header is exercised.
        for m in [magic::SIMPLE_REPLY, magic::STRUCTURED_REPLY, magic::EXTENDED_REPLY] {
            let mut with_magic = m.to_be_bytes().to_vec();
            with_magic.extend_from_slice(&bytes);
            if let Ok(Some((ReplyHeader::Chunk(h), used))) = ReplyHeader::decode(&with_magic, extended, max) {
                let _ = decode_chunk(&h, with_magic.get(used..).unwrap_or_default());
            }
        }
        let h = ChunkHeader { flags, kind, cookie: 0, offset: 0, length: bytes.len() as u64 };
        let _ = decode_chunk(&h, &bytes);
        let h = ChunkHeader { length: max, ..h };
        let _ = decode_chunk(&h, &bytes);
        for k in [0, 1, 2, 5, 6, 0x8001, 0x8002, 0x8003] {
            let h = ChunkHeader { flags, kind: k, cookie: 0, offset: 0, length: bytes.len() as u64 };
            let _ = decode_chunk(&h, &bytes);
            if let Some(p) = bytes.first_chunk::<8>() {
                let _ = decode_offset_data_start(&h, p);
            }
        }
        let _ = BlockStatusFilter::parse(&bytes);
    }

    #[test]
    fn request_decoder_never_panics(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        ops in proptest::collection::vec((0u8..7, 0usize..64), 0..40),
        extended: bool,
    ) {
        let mut d = RequestDecoder::new(extended);
        let mut fed = 0;
        for (op, n) in ops {
            match op {
                0 => {
                    let end = (fed + n).min(bytes.len());
                    d.push(&bytes[fed..end]);
                    fed = end;
                }
                1 => { let _ = d.next(); }
                2 => { let _ = d.take_payload(n); }
                3 => { let mut buf = vec![0; n]; let _ = d.copy_payload(&mut buf); }
                4 => { let _ = d.payload_read_directly(n as u64); }
                5 => d.discard_payload(),
                _ => { let _ = (d.buffered(), d.buffered_payload().len(), d.payload_pending()); }
            }
            prop_assert!(d.buffered_payload().len() as u64 <= d.payload_pending());
        }
    }

    #[test]
    fn decoder_matches_whole_stream(lens in proptest::collection::vec(0u64..40, 1..12), step in 1usize..50, extended: bool) {
        let reqs: Vec<(Request, Vec<u8>)> = lens.iter().enumerate().map(|(i, &len)| {
            let flags = if extended { cmd_flags::PAYLOAD_LEN } else { 0 };
            let r = Request { kind: cmd::WRITE, flags, cookie: i as u64, offset: 0, length: len };
            (r, vec![i as u8; len as usize])
        }).collect();
        let wire = stream(&reqs, extended);
        prop_assert_eq!(run_decoder(&wire, extended, step), reqs);
    }
}
