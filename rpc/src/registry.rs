//! The one command table, independent of transport: JSON-RPC and QMP both
//! dispatch through it, `rpc_get_methods` and `query-commands` list it.
//!
//! A command is a name, a one-line description and a handler taking the
//! control context and the raw params. Handlers decode their params with
//! [`decode`], which rejects unknown members and reports mistakes in QEMU's
//! words ("Parameter 'x' is missing").

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::RpcError;

/// Executes one command on the control context `C`.
pub type Handler<C> = fn(&mut C, Option<Value>) -> Result<Value, RpcError>;

/// One entry of the table.
pub struct Command<C> {
    pub name: &'static str,
    pub help: &'static str,
    pub handler: Handler<C>,
}

/// Commands by name.
pub struct Registry<C> {
    commands: BTreeMap<&'static str, Command<C>>,
}

impl<C> Default for Registry<C> {
    fn default() -> Self {
        Registry { commands: BTreeMap::new() }
    }
}

impl<C> Registry<C> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a command; a name registered twice is a programming error.
    pub fn add(&mut self, name: &'static str, help: &'static str, handler: Handler<C>) {
        let old = self.commands.insert(name, Command { name, help, handler });
        assert!(old.is_none(), "command {name} registered twice");
    }

    pub fn contains(&self, name: &str) -> bool {
        self.commands.contains_key(name)
    }

    /// Runs `method` with `params`.
    pub fn call(&self, ctx: &mut C, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let cmd = self.commands.get(method).ok_or_else(|| RpcError::method_not_found(method))?;
        (cmd.handler)(ctx, params)
    }

    /// Commands in name order.
    pub fn commands(&self) -> impl Iterator<Item = &Command<C>> {
        self.commands.values()
    }
}

/// Decodes a command's params into `T` (which should deny unknown fields).
/// Absent or null params decode as an empty object; positional (array)
/// params are refused. Every mistake is reported in QEMU's words, never
/// the deserializer's (see `qemu_wording`).
pub fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let mut value = match params {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(m)) => Value::Object(m),
        Some(_) => {
            return Err(RpcError::invalid_params("params must be an object of named parameters"));
        }
    };
    // QEMU checks the declared members first and complains about an
    // unexpected one only if they are all right; serde stops at whichever
    // comes first in the input. So an unexpected member is noted, taken
    // out, and the rest decoded again (at most once per member).
    let mut unexpected = None;
    loop {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(t) => return unexpected.map_or(Ok(t), Err),
            Err(e) => e,
        };
        let path = err.path().clone();
        let serde_msg = err.into_inner().to_string();
        let msg = qemu_wording(&path.to_string(), &serde_msg);
        tracing::debug!(%path, serde_msg, msg, "params refused");
        let refused = RpcError::invalid_params(msg);
        if !(serde_msg.starts_with("unknown field `") && remove_member(&mut value, &path)) {
            return Err(refused);
        }
        unexpected.get_or_insert(refused);
    }
}

/// Removes the member `path` names from `value`; false if it is not there.
fn remove_member(value: &mut Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    let segments: Vec<&Segment> = path.iter().collect();
    let Some((Segment::Map { key }, parents)) = segments.split_last() else { return false };
    let mut at = value;
    for seg in parents {
        let next = match seg {
            Segment::Map { key } => at.get_mut(key.as_str()),
            Segment::Seq { index } => at.get_mut(*index),
            Segment::Enum { .. } | Segment::Unknown => None,
        };
        match next {
            Some(v) => at = v,
            None => return false,
        }
    }
    at.as_object_mut().is_some_and(|m| m.remove(key.as_str()).is_some())
}

/// Turns a serde message about the member at `path` into what QEMU's QAPI
/// input visitor says for the same mistake:
///
/// | serde | QEMU |
/// |---|---|
/// | missing field | `Parameter 'x' is missing` |
/// | unknown field | `Parameter 'x' is unexpected` |
/// | unknown variant | `Parameter 'x' does not accept value 'v'` |
/// | wrong type for a string, bool, array, object, enum | `Invalid parameter type for 'x', expected: string` (…) |
/// | wrong type or range for a signed integer (QAPI `int`) | `Invalid parameter type for 'x', expected: integer` |
/// | wrong type for an unsigned integer | `Parameter 'x' expects uint64` (QAPI reads every unsigned type as uint64 first) |
/// | out of range for an unsigned integer | `Parameter 'x' expects uint64` / `uint32_t` / `uint16_t` / `uint8_t` |
/// | wrong type for a float | `Invalid parameter type for 'x', expected: number` |
/// | anything else | `Invalid parameter 'x'` |
///
/// One difference is deliberate: QEMU takes a negative number for a
/// `uint64` member as its two's complement (-1 becomes 2^64 - 1); Spindle
/// refuses it as out of range.
fn qemu_wording(path: &str, msg: &str) -> String {
    let root = path.is_empty() || path == ".";
    let name = |field: &str| if root { field.to_string() } else { format!("{path}.{field}") };
    let quoted = |rest: &str| rest.split('`').next().unwrap_or(rest).to_string();
    if let Some(rest) = msg.strip_prefix("missing field `") {
        return format!("Parameter '{}' is missing", name(&quoted(rest)));
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        // The path already ends with the unknown member.
        let full = if root { quoted(rest) } else { path.to_string() };
        return format!("Parameter '{full}' is unexpected");
    }
    if let Some(rest) = msg.strip_prefix("unknown variant `") {
        // QEMU names the member alone here, not its path.
        let member = path.rsplit('.').next().unwrap_or(path);
        return format!("Parameter '{member}' does not accept value '{}'", quoted(rest));
    }
    let (wrong_type, rest) = match (msg.strip_prefix("invalid type: "), msg.strip_prefix("invalid value: ")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => return format!("Invalid parameter '{path}'"),
    };
    let expected = rest.rsplit(", expected ").next().unwrap_or("");
    let type_error = |t: &str| format!("Invalid parameter type for '{path}', expected: {t}");
    match (kind_of(expected), wrong_type) {
        (Expected::Unsigned(_), true) => format!("Parameter '{path}' expects uint64"),
        (Expected::Unsigned(bits), false) => format!("Parameter '{path}' expects {}", unsigned_name(bits)),
        (Expected::Signed, _) => type_error("integer"),
        (Expected::Number, _) => type_error("number"),
        (Expected::Other(t), true) => type_error(t),
        (Expected::Other(_), false) | (Expected::Unknown, _) => format!("Invalid parameter '{path}'"),
    }
}

/// What serde said it expected, as QAPI types go.
enum Expected {
    /// An unsigned integer of this many bits.
    Unsigned(u32),
    Signed,
    Number,
    /// QAPI's name for another type.
    Other(&'static str),
    Unknown,
}

fn kind_of(expected: &str) -> Expected {
    match expected {
        "u8" => Expected::Unsigned(8),
        "u16" => Expected::Unsigned(16),
        "u32" => Expected::Unsigned(32),
        "u64" | "usize" | "u128" => Expected::Unsigned(64),
        "i8" | "i16" | "i32" | "i64" | "isize" | "i128" => Expected::Signed,
        "f32" | "f64" => Expected::Number,
        "a boolean" => Expected::Other("boolean"),
        // Enums are strings in QAPI; serde_json asks an enum for a string or map.
        "a string" | "a borrowed string" | "a character" | "string or map" => Expected::Other("string"),
        "a sequence" | "a tuple" => Expected::Other("array"),
        e if e == "a map" || e.starts_with("struct ") => Expected::Other("object"),
        _ => Expected::Unknown,
    }
}

fn unsigned_name(bits: u32) -> &'static str {
    match bits {
        8 => "uint8_t",
        16 => "uint16_t",
        32 => "uint32_t",
        _ => "uint64",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    struct P {
        node_name: String,
        #[serde(default)]
        size: Option<u64>,
        #[serde(default)]
        flag: Option<bool>,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
    }

    fn msg(v: Value) -> String {
        decode::<P>(Some(v)).unwrap_err().message
    }

    #[test]
    fn messages_follow_qemu() {
        assert_eq!(msg(json!({})), "Parameter 'node-name' is missing");
        assert_eq!(msg(json!({"node-name": "a", "bogus": 1})), "Parameter 'bogus' is unexpected");
        assert_eq!(msg(json!({"node-nme": "a"})), "Parameter 'node-name' is missing", "a typo is a missing member");
        assert_eq!(msg(json!({"node-name": 5})), "Invalid parameter type for 'node-name', expected: string");
        assert_eq!(msg(json!({"node-name": "a", "size": "big"})), "Parameter 'size' expects uint64");
        assert_eq!(msg(json!({"node-name": "a", "size": -1})), "Parameter 'size' expects uint64");
        assert_eq!(msg(json!({"node-name": "a", "flag": 1})), "Invalid parameter type for 'flag', expected: boolean");
        assert_eq!(msg(json!({"node-name": "a", "mode": "slow"})), "Parameter 'mode' does not accept value 'slow'");
        assert_eq!(decode::<P>(Some(json!([1]))).unwrap_err().message, "params must be an object of named parameters");
        let p: P = decode(Some(json!({"node-name": "x", "size": 4}))).unwrap();
        assert_eq!((p.node_name.as_str(), p.size, p.flag.is_none(), p.mode.is_none()), ("x", Some(4), true, true));
        assert!(matches!(decode::<P>(Some(json!({"node-name": "x", "mode": "fast"}))).unwrap().mode, Some(Mode::Fast)));
    }

    #[test]
    fn absent_params_are_an_empty_object() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Empty {}
        decode::<Empty>(None).unwrap();
        decode::<Empty>(Some(Value::Null)).unwrap();
        assert_eq!(decode::<Empty>(Some(json!({"x": 1}))).unwrap_err().message, "Parameter 'x' is unexpected");
    }

    #[test]
    fn registry_dispatch() {
        let mut r: Registry<u32> = Registry::new();
        r.add("inc", "adds one", |c, _| {
            *c += 1;
            Ok(json!(*c))
        });
        let mut ctx = 0;
        assert_eq!(r.call(&mut ctx, "inc", None).unwrap(), json!(1));
        let e = r.call(&mut ctx, "nope", None).unwrap_err();
        assert_eq!(e.kind, crate::error::ErrorKind::MethodNotFound);
        assert_eq!(r.commands().map(|c| c.name).collect::<Vec<_>>(), ["inc"]);
    }

    /// One member of each kind of type the commands use.
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, rename_all = "kebab-case")]
    #[allow(dead_code)]
    struct Kinds {
        #[serde(default)]
        byte: Option<u8>,
        #[serde(default)]
        small: Option<u32>,
        #[serde(default)]
        big: Option<u64>,
        #[serde(default)]
        signed: Option<i64>,
        #[serde(default)]
        secs: Option<f64>,
        #[serde(default)]
        flag: bool,
        #[serde(default)]
        name: Option<String>,
        #[serde(default)]
        mode: Option<Mode>,
        #[serde(default)]
        list: Option<Vec<Value>>,
        #[serde(default)]
        inner: Option<Inner>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: u64,
    }

    #[test]
    fn every_kind_of_mistake_gets_qemus_words() {
        // What qemu-storage-daemon 10.0 answers for a member of the same
        // QAPI type (uint8/uint32/uint64/int/number/bool/str/enum/array/
        // struct); tests/bad_input.rs checks the commands against it.
        let cases = [
            (json!({"byte": 256}), "Parameter 'byte' expects uint8_t"),
            (json!({"byte": -1}), "Parameter 'byte' expects uint8_t"),
            (json!({"small": -1}), "Parameter 'small' expects uint32_t"),
            (json!({"small": 4294967296u64}), "Parameter 'small' expects uint32_t"),
            (json!({"small": "x"}), "Parameter 'small' expects uint64"),
            (json!({"small": 1.5}), "Parameter 'small' expects uint64"),
            (json!({"big": -1}), "Parameter 'big' expects uint64"),
            (json!({"big": 1.5}), "Parameter 'big' expects uint64"),
            (json!({"big": 18446744073709551616.0}), "Parameter 'big' expects uint64"),
            (json!({"big": true}), "Parameter 'big' expects uint64"),
            (json!({"signed": 1.5}), "Invalid parameter type for 'signed', expected: integer"),
            (json!({"signed": 9223372036854775808u64}), "Invalid parameter type for 'signed', expected: integer"),
            (json!({"signed": "1"}), "Invalid parameter type for 'signed', expected: integer"),
            (json!({"secs": "x"}), "Invalid parameter type for 'secs', expected: number"),
            (json!({"flag": 1}), "Invalid parameter type for 'flag', expected: boolean"),
            (json!({"flag": null}), "Invalid parameter type for 'flag', expected: boolean"),
            (json!({"name": ["a"]}), "Invalid parameter type for 'name', expected: string"),
            (json!({"name": {}}), "Invalid parameter type for 'name', expected: string"),
            (json!({"mode": 1}), "Invalid parameter type for 'mode', expected: string"),
            (json!({"mode": "slow"}), "Parameter 'mode' does not accept value 'slow'"),
            (json!({"list": "x"}), "Invalid parameter type for 'list', expected: array"),
            (json!({"inner": 5}), "Invalid parameter type for 'inner', expected: object"),
            (json!({"inner": {}}), "Parameter 'inner.n' is missing"),
            (json!({"inner": {"n": -2}}), "Parameter 'inner.n' expects uint64"),
            (json!({"inner": {"n": 1, "m": 2}}), "Parameter 'inner.m' is unexpected"),
            (json!({"job-id2": "x"}), "Parameter 'job-id2' is unexpected"),
            // A declared member's mistake comes before an unexpected member,
            // wherever it is (QEMU looks at the declared members first).
            (json!({"bogus": 1, "small": -1}), "Parameter 'small' expects uint32_t"),
            (json!({"inner": {"m": 2}}), "Parameter 'inner.n' is missing"),
            (json!({"zz": 1, "inner": {"n": 1, "m": 2}}), "Parameter 'zz' is unexpected"),
        ];
        for (params, want) in cases {
            let got = decode::<Kinds>(Some(params.clone())).unwrap_err();
            assert_eq!((got.kind, got.message.as_str()), (crate::error::ErrorKind::InvalidParams, want), "{params}");
        }
        // Nothing of serde's own text gets through, whatever it says.
        assert_eq!(qemu_wording("x", "invalid length 3, expected a tuple of size 2"), "Invalid parameter 'x'");
        assert_eq!(qemu_wording("x", "some custom message"), "Invalid parameter 'x'");
        assert_eq!(qemu_wording("x", "invalid type: map, expected something odd"), "Invalid parameter 'x'");
    }
}
