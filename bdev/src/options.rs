//! Reading `blockdev-add` options: typed accessors that remove what they
//! read, so leftovers can be reported, with QEMU's wording for each mistake.

use serde_json::{Map, Value};

use crate::error::BdevError;

/// Options of one node (or one nested object of them), consumed as read.
#[derive(Debug, Clone)]
pub struct OptReader {
    map: Map<String, Value>,
    /// Dotted prefix for messages about nested members (`cache.`).
    prefix: String,
}

fn type_error(key: &str, expected: &str) -> BdevError {
    BdevError::invalid(format!("Invalid parameter type for '{key}', expected: {expected}"))
}

impl OptReader {
    /// Reads a JSON object; anything else is refused.
    pub fn new(value: Value) -> Result<OptReader, BdevError> {
        match value {
            Value::Object(map) => Ok(OptReader { map, prefix: String::new() }),
            _ => Err(BdevError::invalid("Options must be a JSON object")),
        }
    }

    fn full(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// Removes and returns a member, if present (null counts as present).
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key)
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub fn str_opt(&mut self, key: &str) -> Result<Option<String>, BdevError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(&self.full(key), "string")),
        }
    }

    pub fn str_req(&mut self, key: &str) -> Result<String, BdevError> {
        self.str_opt(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn bool_opt(&mut self, key: &str) -> Result<Option<bool>, BdevError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(&self.full(key), "boolean")),
        }
    }

    pub fn u64_opt(&mut self, key: &str) -> Result<Option<u64>, BdevError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Ok(Some(v)),
                None => {
                    Err(BdevError::invalid(format!("Parameter '{}' expects a non-negative integer", self.full(key))))
                }
            },
            Some(_) => Err(type_error(&self.full(key), "integer")),
        }
    }

    pub fn u64_req(&mut self, key: &str) -> Result<u64, BdevError> {
        self.u64_opt(key)?.ok_or_else(|| self.missing(key))
    }

    /// A string member restricted to `allowed` values.
    pub fn enum_opt(&mut self, key: &str, allowed: &[&str]) -> Result<Option<String>, BdevError> {
        let Some(v) = self.str_opt(key)? else {
            return Ok(None);
        };
        if allowed.contains(&v.as_str()) {
            Ok(Some(v))
        } else {
            // QEMU names the member alone here, not its path.
            Err(BdevError::invalid(format!("Parameter '{key}' does not accept value '{v}'")))
        }
    }

    /// A nested object member, read with its own reader.
    pub fn object_opt(&mut self, key: &str) -> Result<Option<OptReader>, BdevError> {
        match self.map.remove(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(OptReader { map, prefix: format!("{}.", self.full(key)) })),
            Some(_) => Err(type_error(&self.full(key), "object")),
        }
    }

    pub fn missing(&self, key: &str) -> BdevError {
        BdevError::invalid(format!("Parameter '{}' is missing", self.full(key)))
    }

    /// Fails on the first member nobody read.
    pub fn finish(self) -> Result<(), BdevError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(BdevError::invalid(format!("Parameter '{}{k}' is unexpected", self.prefix))),
        }
    }
}

/// How discard requests are treated (`discard` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discards succeed without deallocating anything (QEMU's default).
    #[default]
    Ignore,
    /// Discards deallocate.
    Unmap,
}

/// Turning zero-filled writes into write-zeroes (`detect-zeroes` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    #[default]
    Off,
    On,
    /// Like `On`, and the zeroed range may be deallocated when `discard=unmap`.
    Unmap,
}

impl DetectZeroes {
    pub fn name(self) -> &'static str {
        match self {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        }
    }
}

/// Whether O_DIRECT is wanted (`cache.direct`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirectMode {
    /// Not given: O_DIRECT where the file system supports it, buffered otherwise.
    #[default]
    Auto,
    On,
    Off,
}

/// The options every node accepts (QEMU's `BlockdevOptions` base).
#[derive(Debug, Clone, Default)]
pub struct CommonOptions {
    pub node_name: String,
    pub driver: String,
    pub read_only: bool,
    pub auto_read_only: bool,
    /// Shares every permission with other users, also of other processes
    /// (read-only nodes only).
    pub force_share: bool,
    pub direct: DirectMode,
    pub no_flush: bool,
    pub discard: DiscardMode,
    pub detect_zeroes: DetectZeroes,
}

impl CommonOptions {
    /// Reads the common members out of `opts` (node-name is handled by the caller).
    pub fn read(opts: &mut OptReader) -> Result<CommonOptions, BdevError> {
        let driver = opts.str_req("driver")?;
        let read_only = opts.bool_opt("read-only")?.unwrap_or(false);
        let auto_read_only = opts.bool_opt("auto-read-only")?.unwrap_or(false);
        let force_share = opts.bool_opt("force-share")?.unwrap_or(false);
        if force_share && !read_only {
            return Err(BdevError::invalid("force-share=on can only be used with read-only images"));
        }
        let (direct, no_flush) = match opts.object_opt("cache")? {
            None => (DirectMode::Auto, false),
            Some(mut cache) => {
                let direct = match cache.bool_opt("direct")? {
                    None => DirectMode::Auto,
                    Some(true) => DirectMode::On,
                    Some(false) => DirectMode::Off,
                };
                let no_flush = cache.bool_opt("no-flush")?.unwrap_or(false);
                cache.finish()?;
                (direct, no_flush)
            }
        };
        let discard = match opts.enum_opt("discard", &["ignore", "off", "unmap", "on"])?.as_deref() {
            Some("unmap") | Some("on") => DiscardMode::Unmap,
            _ => DiscardMode::Ignore,
        };
        let detect_zeroes = match opts.enum_opt("detect-zeroes", &["off", "on", "unmap"])?.as_deref() {
            Some("on") => DetectZeroes::On,
            Some("unmap") => DetectZeroes::Unmap,
            _ => DetectZeroes::Off,
        };
        Ok(CommonOptions {
            node_name: String::new(),
            driver,
            read_only,
            auto_read_only,
            force_share,
            direct,
            no_flush,
            discard,
            detect_zeroes,
        })
    }
}

/// A node name as QEMU accepts it: a letter first, then letters, digits,
/// `-`, `.` and `_`, at most 31 bytes.
pub fn validate_node_name(name: &str) -> Result<(), BdevError> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !well_formed {
        return Err(BdevError::invalid(format!("Invalid node-name: '{name}'")));
    }
    if name.len() > NODE_NAME_BYTES_MAX {
        return Err(BdevError::invalid("Node name too long"));
    }
    Ok(())
}

/// Longest node name QEMU accepts.
pub const NODE_NAME_BYTES_MAX: usize = 31;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn qemu_wording_for_mistakes() {
        let mut o = OptReader::new(json!({"size": "big", "n": -1, "cache": {"direct": 1}, "x": 1})).unwrap();
        assert_eq!(o.u64_opt("size").unwrap_err().to_string(), "Invalid parameter type for 'size', expected: integer");
        assert_eq!(o.u64_opt("n").unwrap_err().to_string(), "Parameter 'n' expects a non-negative integer");
        let mut c = o.object_opt("cache").unwrap().unwrap();
        assert_eq!(
            c.bool_opt("direct").unwrap_err().to_string(),
            "Invalid parameter type for 'cache.direct', expected: boolean"
        );
        assert_eq!(o.str_req("filename").unwrap_err().to_string(), "Parameter 'filename' is missing");
        assert_eq!(o.finish().unwrap_err().to_string(), "Parameter 'x' is unexpected");
        let mut o = OptReader::new(json!({"discard": "maybe"})).unwrap();
        assert_eq!(
            o.enum_opt("discard", &["ignore", "unmap"]).unwrap_err().to_string(),
            "Parameter 'discard' does not accept value 'maybe'"
        );
        let o = OptReader::new(json!({"cache": {"bogus": true}})).unwrap();
        let mut o2 = o.clone();
        let c = o2.object_opt("cache").unwrap().unwrap();
        assert_eq!(c.finish().unwrap_err().to_string(), "Parameter 'cache.bogus' is unexpected");
        assert!(OptReader::new(json!([1])).is_err());
    }

    #[test]
    fn common_options() {
        let mut o = OptReader::new(json!({"driver": "file", "read-only": true, "cache": {"direct": false, "no-flush": true}, "discard": "unmap", "detect-zeroes": "on"})).unwrap();
        let c = CommonOptions::read(&mut o).unwrap();
        assert_eq!(c.driver, "file");
        assert!(c.read_only && c.no_flush);
        assert_eq!(c.direct, DirectMode::Off);
        assert_eq!(c.discard, DiscardMode::Unmap);
        assert_eq!(c.detect_zeroes, DetectZeroes::On);
        o.finish().unwrap();
    }

    #[test]
    fn node_names() {
        for ok in ["a", "disk0", "a.b-c_d", "A234567890123456789012345678901"] {
            validate_node_name(ok).unwrap();
        }
        for bad in ["", "1bad", "#block1", "a b", "é"] {
            assert_eq!(validate_node_name(bad).unwrap_err().to_string(), format!("Invalid node-name: '{bad}'"));
        }
        assert_eq!(
            validate_node_name("a2345678901234567890123456789012").unwrap_err().to_string(),
            "Node name too long"
        );
    }
}
