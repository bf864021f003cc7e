use super::*;
use crate::consts::{OPTION_BYTES_MAX, REPLY_BYTES_MAX, STRING_BYTES_MAX, transmission_flags};
use proptest::prelude::*;

fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}

#[test]
fn greeting_bytes() {
    let g = Greeting { handshake_flags: handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES };
    let bytes = g.encode();
    let want: [u8; 18] =
        [b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O', b'P', b'T', 0, 3];
    assert_eq!(bytes, want);
    assert_eq!(Greeting::decode(&bytes), Ok(g));
}

#[test]
fn greeting_bad_magic() {
    let mut bytes = Greeting { handshake_flags: 1 }.encode();
    bytes[0] = b'X';
    assert!(matches!(Greeting::decode(&bytes), Err(ProtoError::BadMagic { what: "NBDMAGIC", .. })));
    // An oldstyle server sends cliserv_magic where IHAVEOPT belongs.
    let mut old = [0u8; 18];
    old[..8].copy_from_slice(&magic::NBDMAGIC.to_be_bytes());
    old[8..16].copy_from_slice(&magic::CLISERV.to_be_bytes());
    assert_eq!(
        Greeting::decode(&old),
        Err(ProtoError::BadMagic { what: "IHAVEOPT", expected: magic::IHAVEOPT, got: magic::CLISERV })
    );
}

#[test]
fn client_flags_checked_against_advertised() {
    let both = handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;
    let f = ClientFlags::decode(&[0, 0, 0, 3], both).unwrap();
    assert!(f.fixed_newstyle() && f.no_zeroes());
    assert_eq!(f.bits(), 3);
    assert_eq!(ClientFlags::decode(&[0, 0, 0, 0], both).unwrap(), ClientFlags::default());
    // Unknown bit.
    assert_eq!(ClientFlags::decode(&[0, 0, 0, 5], both), Err(ProtoError::BadClientFlags { flags: 5, unexpected: 4 }));
    assert_eq!(
        ClientFlags::decode(&[0x80, 0, 0, 1], both),
        Err(ProtoError::BadClientFlags { flags: 0x8000_0001, unexpected: 0x8000_0000 })
    );
    // NO_ZEROES not advertised.
    assert_eq!(
        ClientFlags::decode(&[0, 0, 0, 3], handshake_flags::FIXED_NEWSTYLE),
        Err(ProtoError::BadClientFlags { flags: 3, unexpected: 2 })
    );
    // Client side round trip.
    let n = ClientFlags::negotiate(both | 0x8000);
    assert_eq!(n.encode(), [0, 0, 0, 3]);
    assert_eq!(ClientFlags::decode(&n.encode(), both), Ok(n));
    assert_eq!(ClientFlags::negotiate(handshake_flags::FIXED_NEWSTYLE).bits(), 1);
}

#[test]
fn info_go_request_bytes() {
    let req = InfoRequest { name: "disk".into(), info_types: vec![info::BLOCK_SIZE, info::NAME] };
    let mut wire = Vec::new();
    req.to_option(opt::GO).unwrap().encode(&mut wire).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(b"IHAVEOPT");
    want.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 14]);
    want.extend_from_slice(&[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 2, 0, 3, 0, 1]);
    assert_eq!(wire, want);

    let (opt_req, used) = OptionRequest::decode(&wire, OPTION_BYTES_MAX).unwrap().unwrap();
    assert_eq!(used, wire.len());
    assert_eq!(opt_req.code, opt::GO);
    assert_eq!(InfoRequest::parse(&opt_req.data), Ok(req));
}

#[test]
fn info_request_errors() {
    // Name length beyond the data.
    let data = [0, 0, 0, 9, b'a', 0, 0];
    assert!(matches!(InfoRequest::parse(&data), Err(ProtoError::ShortPayload { need: 13, got: 7, .. })));
    // Count says 2, only 1 present.
    let data = [0, 0, 0, 1, b'a', 0, 2, 0, 0];
    assert_eq!(
        InfoRequest::parse(&data),
        Err(ProtoError::CountMismatch { what: "information requests", declared: 2, found: 1 })
    );
    // Count says 1, 2 present.
    let data = [0, 0, 0, 1, b'a', 0, 1, 0, 0, 0, 3];
    assert!(matches!(InfoRequest::parse(&data), Err(ProtoError::TrailingBytes { extra: 2, .. })));
    // Odd trailing byte.
    let data = [0, 0, 0, 0, 0, 0, 7];
    assert!(matches!(InfoRequest::parse(&data), Err(ProtoError::TrailingBytes { extra: 1, .. })));
    // Missing count.
    assert!(matches!(InfoRequest::parse(&[0, 0, 0, 0]), Err(ProtoError::ShortPayload { need: 6, .. })));
    assert!(matches!(InfoRequest::parse(&[]), Err(ProtoError::ShortPayload { need: 4, got: 0, .. })));
    // Empty name, empty list: the default export.
    assert_eq!(InfoRequest::parse(&[0, 0, 0, 0, 0, 0]), Ok(InfoRequest::default()));
    // Overlong name.
    let mut data = be32(STRING_BYTES_MAX as u32 + 1).to_vec();
    data.extend(std::iter::repeat_n(b'x', STRING_BYTES_MAX + 1));
    data.extend_from_slice(&[0, 0]);
    assert!(matches!(InfoRequest::parse(&data), Err(ProtoError::StringTooLong { what: "export name", .. })));
    // Bad name bytes.
    assert_eq!(InfoRequest::parse(&[0, 0, 0, 1, 0, 0, 0]), Err(ProtoError::ContainsNul { what: "export name" }));
    assert_eq!(InfoRequest::parse(&[0, 0, 0, 1, 0xff, 0, 0]), Err(ProtoError::NotUtf8 { what: "export name" }));
}

#[test]
fn meta_context_request_round_trip_and_bytes() {
    let req = MetaContextRequest { name: "d".into(), queries: vec!["base:allocation".into(), "qemu:".into()] };
    let data = req.encode().unwrap();
    let mut want = vec![0, 0, 0, 1, b'd', 0, 0, 0, 2, 0, 0, 0, 15];
    want.extend_from_slice(b"base:allocation");
    want.extend_from_slice(&[0, 0, 0, 5]);
    want.extend_from_slice(b"qemu:");
    assert_eq!(data, want);
    assert_eq!(MetaContextRequest::parse(&data), Ok(req.clone()));
    let o = req.to_option(opt::SET_META_CONTEXT).unwrap();
    assert_eq!(o.code, opt::SET_META_CONTEXT);
    assert_eq!(MetaContextRequest::parse(&[0, 0, 0, 0, 0, 0, 0, 0]), Ok(MetaContextRequest::default()));
}

#[test]
fn meta_context_request_errors() {
    // Count 3, two queries.
    let mut data = vec![0, 0, 0, 0, 0, 0, 0, 3];
    data.extend_from_slice(&[0, 0, 0, 2, b'a', b':', 0, 0, 0, 0]);
    assert_eq!(
        MetaContextRequest::parse(&data),
        Err(ProtoError::CountMismatch { what: "meta context queries", declared: 3, found: 2 })
    );
    // Huge count with no data must not allocate or loop.
    assert_eq!(
        MetaContextRequest::parse(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
        Err(ProtoError::CountMismatch { what: "meta context queries", declared: u64::from(u32::MAX), found: 0 })
    );
    // Query length past the end.
    let data = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'a'];
    assert!(matches!(MetaContextRequest::parse(&data), Err(ProtoError::ShortPayload { need: 17, got: 13, .. })));
    // Partial query length field.
    let data = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    assert!(matches!(MetaContextRequest::parse(&data), Err(ProtoError::ShortPayload { .. })));
    // Trailing bytes after the last query.
    let data = [0, 0, 0, 0, 0, 0, 0, 0, 1];
    assert!(matches!(MetaContextRequest::parse(&data), Err(ProtoError::TrailingBytes { extra: 1, .. })));
    // Overlong query.
    let mut data = vec![0, 0, 0, 0, 0, 0, 0, 1];
    data.extend_from_slice(&be32(5000));
    data.extend(std::iter::repeat_n(b'q', 5000));
    assert!(matches!(
        MetaContextRequest::parse(&data),
        Err(ProtoError::StringTooLong { what: "meta context query", len: 5000, .. })
    ));
}

#[test]
fn option_request_stream_decoding() {
    let mut wire = Vec::new();
    OptionRequest::new(opt::STRUCTURED_REPLY).encode(&mut wire).unwrap();
    OptionRequest::export_name("exp").unwrap().encode(&mut wire).unwrap();
    assert_eq!(&wire[..16], b"IHAVEOPT\0\0\0\x08\0\0\0\0");

    // Byte by byte: nothing until each option is whole.
    let mut got = Vec::new();
    let mut buf = Vec::new();
    for &b in &wire {
        buf.push(b);
        while let Some((o, used)) = OptionRequest::decode(&buf, OPTION_BYTES_MAX).unwrap() {
            buf.drain(..used);
            got.push(o);
        }
    }
    assert!(buf.is_empty());
    assert_eq!(got, vec![OptionRequest::new(opt::STRUCTURED_REPLY), OptionRequest::export_name("exp").unwrap()]);
    assert_eq!(parse_export_name(&got[1].data), Ok("exp".to_owned()));
}

#[test]
fn option_request_errors() {
    // Too long: refused from the header alone.
    let header = OptionHeader { code: opt::GO, len: 70_000 }.encode();
    assert_eq!(
        OptionRequest::decode(&header, OPTION_BYTES_MAX),
        Err(ProtoError::OptionTooLong { code: opt::GO, len: 70_000, max: OPTION_BYTES_MAX })
    );
    let header = OptionHeader { code: opt::GO, len: u32::MAX }.encode();
    assert!(matches!(OptionRequest::decode(&header, OPTION_BYTES_MAX), Err(ProtoError::OptionTooLong { .. })));
    // Bad magic.
    let mut bad = OptionHeader { code: 1, len: 0 }.encode();
    bad[7] ^= 1;
    assert!(matches!(OptionRequest::decode(&bad, 16), Err(ProtoError::BadMagic { what: "option request", .. })));
    // Incomplete data.
    let mut wire = Vec::new();
    OptionRequest::export_name("abc").unwrap().encode(&mut wire).unwrap();
    assert_eq!(OptionRequest::decode(&wire[..18], 64), Ok(None));
    assert_eq!(OptionRequest::decode(&[], 64), Ok(None));
    // Overlong export name.
    assert!(OptionRequest::export_name(&"n".repeat(STRING_BYTES_MAX + 1)).is_err());
    assert!(matches!(parse_export_name(&[b'n'; 4097]), Err(ProtoError::StringTooLong { len: 4097, max: 4096, .. })));
    assert!(parse_export_name(&[b'n'; 4096]).is_ok());
}

#[test]
fn option_reply_bytes_and_round_trip() {
    let mut wire = Vec::new();
    encode_ack(opt::STRUCTURED_REPLY, &mut wire);
    let mut want = vec![0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9];
    want.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]);
    assert_eq!(wire, want);
    let (r, used) = OptionReply::decode(&wire, REPLY_BYTES_MAX).unwrap().unwrap();
    assert_eq!(used, 20);
    assert_eq!(r.parse(), Ok(ReplyData::Ack));
    assert!(!r.is_error());

    let mut wire = Vec::new();
    encode_error(opt::GO, rep::ERR_UNKNOWN, "no such export", &mut wire).unwrap();
    let (r, _) = OptionReply::decode(&wire, REPLY_BYTES_MAX).unwrap().unwrap();
    assert!(r.is_error());
    assert_eq!(r.parse(), Ok(ReplyData::Error { reply_type: rep::ERR_UNKNOWN, message: "no such export".into() }));
    let mut wire = Vec::new();
    encode_error(opt::GO, rep::ERR_UNSUP, "", &mut wire).unwrap();
    assert_eq!(wire.len(), 20);

    let r = OptionReply { option: 9, reply_type: 77, data: vec![1, 2] };
    let mut wire = Vec::new();
    r.encode(&mut wire).unwrap();
    assert_eq!(OptionReply::decode(&wire, 64).unwrap(), Some((r.clone(), 22)));
    assert_eq!(r.parse(), Ok(ReplyData::Unknown { reply_type: 77 }));
}

#[test]
fn option_reply_errors() {
    let h = OptionReplyHeader { option: 3, reply_type: rep::SERVER, len: 100_000 }.encode();
    assert_eq!(
        OptionReply::decode(&h, REPLY_BYTES_MAX),
        Err(ProtoError::ReplyTooLong { option: 3, reply_type: rep::SERVER, len: 100_000, max: REPLY_BYTES_MAX })
    );
    let mut bad = OptionReplyHeader { option: 3, reply_type: 1, len: 0 }.encode();
    bad[0] = 1;
    assert!(matches!(OptionReply::decode(&bad, 64), Err(ProtoError::BadMagic { what: "option reply", .. })));
    assert_eq!(OptionReply::decode(&bad[..19], 64), Ok(None));
    // ACK with data.
    let r = OptionReply { option: 3, reply_type: rep::ACK, data: vec![0] };
    assert!(matches!(r.parse(), Err(ProtoError::TrailingBytes { extra: 1, .. })));
}

#[test]
fn server_entry() {
    let e = ServerEntry { name: "a".into(), description: "first disk".into() };
    let mut wire = Vec::new();
    e.encode(&mut wire).unwrap();
    let (r, _) = OptionReply::decode(&wire, REPLY_BYTES_MAX).unwrap().unwrap();
    assert_eq!((r.option, r.reply_type), (opt::LIST, rep::SERVER));
    assert_eq!(&r.data[..5], &[0, 0, 0, 1, b'a']);
    assert_eq!(r.parse(), Ok(ReplyData::Server(e)));
    let bare = ServerEntry { name: "b".into(), description: String::new() };
    let mut wire = Vec::new();
    bare.encode(&mut wire).unwrap();
    assert_eq!(wire.len(), 20 + 5);
    assert_eq!(ServerEntry::parse(&wire[20..]), Ok(bare));
    // Name length past the data.
    assert!(matches!(ServerEntry::parse(&[0, 0, 0, 2, b'a']), Err(ProtoError::ShortPayload { .. })));
}

#[test]
fn info_replies() {
    let export = InfoReply::Export(ExportInfo {
        size: 1 << 30,
        transmission_flags: transmission_flags::HAS_FLAGS | transmission_flags::SEND_FLUSH,
    });
    let data = export.encode_data().unwrap();
    assert_eq!(data, [0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 5]);
    let bs = InfoReply::BlockSize(BlockSize { min: 512, preferred: 4096, max: 1 << 25 });
    assert_eq!(bs.encode_data().unwrap(), [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 0x02, 0, 0, 0]);
    for reply in [
        export,
        bs,
        InfoReply::Name("canon".into()),
        InfoReply::Description("a disk".into()),
        InfoReply::Unknown { info_type: 42, payload: vec![9, 9] },
    ] {
        let mut wire = Vec::new();
        reply.encode(opt::GO, &mut wire).unwrap();
        let (r, _) = OptionReply::decode(&wire, REPLY_BYTES_MAX).unwrap().unwrap();
        assert_eq!((r.option, r.reply_type), (opt::GO, rep::INFO));
        assert_eq!(r.parse(), Ok(ReplyData::Info(reply)));
    }
    // Exact lengths for fixed-size types.
    assert!(matches!(InfoReply::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Err(ProtoError::ShortPayload { .. })));
    assert!(matches!(
        InfoReply::parse(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
        Err(ProtoError::TrailingBytes { extra: 1, .. })
    ));
    assert!(matches!(InfoReply::parse(&[0, 3, 0, 0, 2, 0]), Err(ProtoError::ShortPayload { .. })));
    assert!(matches!(InfoReply::parse(&[0]), Err(ProtoError::ShortPayload { .. })));
    assert_eq!(InfoReply::parse(&[0, 1]), Ok(InfoReply::Name(String::new())));
}

#[test]
fn meta_context_reply() {
    let m = MetaContext { id: 7, name: "base:allocation".into() };
    let mut wire = Vec::new();
    m.encode(opt::SET_META_CONTEXT, &mut wire).unwrap();
    assert_eq!(&wire[20..24], &[0, 0, 0, 7]);
    assert_eq!(&wire[24..], b"base:allocation");
    let (r, _) = OptionReply::decode(&wire, REPLY_BYTES_MAX).unwrap().unwrap();
    assert_eq!(r.parse(), Ok(ReplyData::MetaContext(m)));
    assert!(matches!(MetaContext::parse(&[0, 0, 0]), Err(ProtoError::ShortPayload { .. })));
}

#[test]
fn export_name_reply() {
    let e = ExportInfo { size: 0x0102_0304_0506_0708, transmission_flags: 0x0009 };
    let mut with_zeroes = Vec::new();
    encode_export_name_reply(e, false, &mut with_zeroes);
    assert_eq!(with_zeroes.len(), 134);
    assert_eq!(&with_zeroes[..10], &[1, 2, 3, 4, 5, 6, 7, 8, 0, 9]);
    assert!(with_zeroes[10..].iter().all(|&b| b == 0));
    let mut bare = Vec::new();
    encode_export_name_reply(e, true, &mut bare);
    assert_eq!(bare, with_zeroes[..10]);

    assert_eq!(decode_export_name_reply(&with_zeroes, false), Ok(Some((e, 134))));
    assert_eq!(decode_export_name_reply(&with_zeroes[..133], false), Ok(None));
    assert_eq!(decode_export_name_reply(&bare, true), Ok(Some((e, 10))));
    assert_eq!(decode_export_name_reply(&bare[..9], true), Ok(None));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), max in 0usize..300) {
        if let Some(a) = bytes.first_chunk::<GREETING_BYTES>() {
            let _ = Greeting::decode(a);
        }
        if let Some(a) = bytes.first_chunk::<CLIENT_FLAGS_BYTES>() {
            let _ = ClientFlags::decode(a, 3);
        }
        let _ = OptionRequest::decode(&bytes, max);
        let _ = OptionReply::decode(&bytes, max);
        // Skip the magic so the rest of the header is exercised too.
        let mut with_magic = magic::IHAVEOPT.to_be_bytes().to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = OptionRequest::decode(&with_magic, max);
        let mut with_magic = magic::OPTION_REPLY.to_be_bytes().to_vec();
        with_magic.extend_from_slice(&bytes);
        if let Ok(Some((r, _))) = OptionReply::decode(&with_magic, max) {
            let _ = r.parse();
        }
        let _ = parse_export_name(&bytes);
        let _ = InfoRequest::parse(&bytes);
        let _ = MetaContextRequest::parse(&bytes);
        let _ = ServerEntry::parse(&bytes);
        let _ = InfoReply::parse(&bytes);
        let _ = MetaContext::parse(&bytes);
        for rt in [rep::ACK, rep::SERVER, rep::INFO, rep::META_CONTEXT, rep::ERR_INVALID, 99] {
            let _ = OptionReply { option: 1, reply_type: rt, data: bytes.clone() }.parse();
        }
        let _ = decode_export_name_reply(&bytes, false);
        let _ = decode_export_name_reply(&bytes, true);
    }

    #[test]
    fn info_request_round_trips(name in "[a-z0-9/._-]{0,40}", types in proptest::collection::vec(any::<u16>(), 0..20)) {
        let req = InfoRequest { name, info_types: types };
        let data = req.encode().unwrap();
        prop_assert_eq!(InfoRequest::parse(&data), Ok(req));
    }

    #[test]
    fn meta_request_round_trips(name in "[a-z0-9]{0,20}", queries in proptest::collection::vec("[a-z]{1,8}:[a-z]{0,8}", 0..8)) {
        let req = MetaContextRequest { name, queries };
        let data = req.encode().unwrap();
        prop_assert_eq!(MetaContextRequest::parse(&data), Ok(req));
    }
}
