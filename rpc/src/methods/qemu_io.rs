//! The subset of qemu-io's command language that `x-debug-io` speaks:
//! `read`, `write`, `discard`, `flush`, `length`, with qemu-io's options
//! and number syntax (`64k`, `1M`, `0x1000`).

/// Pattern qemu-io writes when `-P` is not given.
pub const WRITE_PATTERN_DEFAULT: u8 = 0xcd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoCommand {
    /// `read [-P pattern] [-v] [-q] off len`
    Read {
        offset: u64,
        len: u64,
        pattern: Option<u8>,
        verbose: bool,
        quiet: bool,
    },
    /// `write [-P pattern | -z [-u] [-n]] [-c] [-f] [-q] off len`
    Write {
        offset: u64,
        len: u64,
        pattern: u8,
        zero: bool,
        unmap: bool,
        no_fallback: bool,
        /// Stored compressed (qcow2); ignored with `-z`, as qemu-io does.
        compressed: bool,
        fua: bool,
        quiet: bool,
    },
    /// `discard [-q] off len`
    Discard {
        offset: u64,
        len: u64,
        quiet: bool,
    },
    Flush,
    Length,
}

/// Parses a size or offset like qemu-io: decimal or `0x` hex, with an
/// optional binary suffix (`b`, `k`, `M`, `G`, `T`, `P`, `E`; any case).
pub fn parse_num(text: &str) -> Result<u64, String> {
    let bad = || format!("invalid number '{text}'");
    let t = text.trim();
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| bad());
    }
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(bad()),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let v: u64 = digits.parse().map_err(|_| bad())?;
    v.checked_mul(1u64 << shift).ok_or_else(bad)
}

fn parse_pattern(text: &str) -> Result<u8, String> {
    let v = if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16)
    } else {
        text.parse::<u64>()
    }
    .map_err(|_| format!("invalid pattern '{text}'"))?;
    u8::try_from(v).map_err(|_| format!("pattern {text} does not fit in a byte"))
}

/// Parses one command line.
pub fn parse(line: &str) -> Result<IoCommand, String> {
    let mut words = line.split_whitespace();
    let Some(name) = words.next() else {
        return Err("empty command".into());
    };
    let mut flags = Vec::new();
    let mut pattern = None;
    let mut positional = Vec::new();
    while let Some(w) = words.next() {
        if let Some(opts) =
            w.strip_prefix('-').filter(|o| !o.is_empty() && !o.starts_with(|c: char| c.is_ascii_digit()))
        {
            for (i, c) in opts.char_indices() {
                if c == 'P' {
                    let rest = &opts[i + 1..];
                    let arg = if rest.is_empty() { words.next().ok_or("-P needs a pattern")? } else { rest };
                    pattern = Some(parse_pattern(arg)?);
                    break;
                }
                flags.push(c);
            }
        } else {
            positional.push(w);
        }
    }
    let allowed = |ok: &str| match flags.iter().find(|c| !ok.contains(**c)) {
        Some(c) => Err(format!("{name}: invalid option -- '{c}'")),
        None => Ok(()),
    };
    let has = |c: char| flags.contains(&c);
    let range = |positional: &[&str]| -> Result<(u64, u64), String> {
        match positional {
            [off, len] => Ok((parse_num(off)?, parse_num(len)?)),
            _ => Err(format!("{name}: expected an offset and a length")),
        }
    };
    match name {
        "read" => {
            allowed("vq")?;
            let (offset, len) = range(&positional)?;
            Ok(IoCommand::Read { offset, len, pattern, verbose: has('v'), quiet: has('q') })
        }
        "write" => {
            allowed("zuncfq")?;
            let (offset, len) = range(&positional)?;
            let zero = has('z');
            if zero && pattern.is_some() {
                return Err("write: -z and -P cannot be specified at the same time".into());
            }
            if (has('u') || has('n')) && !zero {
                return Err("write: -u and -n need -z".into());
            }
            Ok(IoCommand::Write {
                offset,
                len,
                pattern: pattern.unwrap_or(WRITE_PATTERN_DEFAULT),
                zero,
                unmap: has('u'),
                no_fallback: has('n'),
                compressed: has('c'),
                fua: has('f'),
                quiet: has('q'),
            })
        }
        "discard" | "aio_discard" => {
            allowed("q")?;
            let (offset, len) = range(&positional)?;
            Ok(IoCommand::Discard { offset, len, quiet: has('q') })
        }
        "flush" | "aio_flush" if positional.is_empty() && flags.is_empty() => Ok(IoCommand::Flush),
        "length" if positional.is_empty() && flags.is_empty() => Ok(IoCommand::Length),
        "flush" | "aio_flush" | "length" => Err(format!("{name} takes no arguments")),
        other => Err(format!("unknown command '{other}' (supported: read, write, discard, flush, length)")),
    }
}

/// A size the way qemu-io prints one (`64 KiB`, `1.500 MiB`, `512 bytes`).
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut v = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    if v.fract() == 0.0 { format!("{v:.0} {unit}") } else { format!("{v:.3} {unit}") }
}

/// qemu-io's hex dump (`read -v`): 16 bytes a line, offset, hex, ASCII.
pub fn hexdump(offset: u64, data: &[u8]) -> String {
    let mut out = String::new();
    for (i, line) in data.chunks(16).enumerate() {
        out.push_str(&format!("{:08x}:  ", offset + (i * 16) as u64));
        for b in line {
            out.push_str(&format!("{b:02x} "));
        }
        for _ in line.len()..16 {
            out.push_str("   ");
        }
        out.push(' ');
        out.extend(line.iter().map(|&b| if (0x20..0x7f).contains(&b) { b as char } else { '.' }));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_num("512").unwrap(), 512);
        assert_eq!(parse_num("64k").unwrap(), 65536);
        assert_eq!(parse_num("64K").unwrap(), 65536);
        assert_eq!(parse_num("1M").unwrap(), 1 << 20);
        assert_eq!(parse_num("2g").unwrap(), 2 << 30);
        assert_eq!(parse_num("0x1000").unwrap(), 4096);
        assert_eq!(parse_num("4b").unwrap(), 4);
        assert!(parse_num("1x").is_err());
        assert!(parse_num("").is_err());
        assert!(parse_num("99999999999E").is_err());
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse("write -P 0xab 0 64k").unwrap(),
            IoCommand::Write {
                offset: 0,
                len: 65536,
                pattern: 0xab,
                zero: false,
                unmap: false,
                no_fallback: false,
                compressed: false,
                fua: false,
                quiet: false
            }
        );
        assert_eq!(
            parse("write -zu 1M 1M").unwrap(),
            IoCommand::Write {
                offset: 1 << 20,
                len: 1 << 20,
                pattern: 0xcd,
                zero: true,
                unmap: true,
                no_fallback: false,
                compressed: false,
                fua: false,
                quiet: false
            }
        );
        assert!(matches!(parse("write -c -P 1 0 64k").unwrap(), IoCommand::Write { compressed: true, .. }));
        assert_eq!(
            parse("read -P 171 -v 512 512").unwrap(),
            IoCommand::Read { offset: 512, len: 512, pattern: Some(171), verbose: true, quiet: false }
        );
        assert_eq!(
            parse("read -P0xab 0 1").unwrap(),
            IoCommand::Read { offset: 0, len: 1, pattern: Some(0xab), verbose: false, quiet: false }
        );
        assert_eq!(parse("discard -q 0 4k").unwrap(), IoCommand::Discard { offset: 0, len: 4096, quiet: true });
        assert_eq!(parse("flush").unwrap(), IoCommand::Flush);
        assert_eq!(parse("length").unwrap(), IoCommand::Length);
        assert!(parse("write -z -P 1 0 1").unwrap_err().contains("-z and -P"));
        assert!(parse("write -u 0 1").unwrap_err().contains("need -z"));
        assert!(parse("read -x 0 1").unwrap_err().contains("invalid option -- 'x'"));
        assert!(parse("read 0").unwrap_err().contains("offset and a length"));
        assert!(parse("read -P 256 0 1").unwrap_err().contains("does not fit"));
        assert!(parse("frob 0 1").unwrap_err().contains("unknown command"));
        assert!(parse("").is_err());
    }

    #[test]
    fn sizes_and_dump() {
        assert_eq!(human_size(512), "512 bytes");
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(1 << 20), "1 MiB");
        assert_eq!(human_size(1536 * 1024), "1.500 MiB");
        let d = hexdump(16, b"AB\x00");
        assert_eq!(d, format!("00000010:  41 42 00 {} AB.\n", "   ".repeat(13)));
    }
}
