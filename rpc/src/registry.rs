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
/// params are refused.
pub fn decode<T: DeserializeOwned>(params: Option<Value>) -> Result<T, RpcError> {
    let value = match params {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(m)) => Value::Object(m),
        Some(_) => {
            return Err(RpcError::invalid_params("params must be an object of named parameters"));
        }
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        RpcError::invalid_params(qemu_wording(&path, &e.into_inner().to_string()))
    })
}

/// Turns serde's messages into QEMU's: "Parameter 'x' is missing",
/// "Parameter 'x' is unexpected", "Invalid parameter type for 'x', expected: ...".
fn qemu_wording(path: &str, msg: &str) -> String {
    let prefix = |name: &str| {
        if path.is_empty() || path == "." { name.to_string() } else { format!("{path}.{name}") }
    };
    if let Some(rest) = msg.strip_prefix("missing field `") {
        let name = rest.split('`').next().unwrap_or(rest);
        return format!("Parameter '{}' is missing", prefix(name));
    }
    if let Some(rest) = msg.strip_prefix("unknown field `") {
        // The path already ends with the unknown member.
        let name = rest.split('`').next().unwrap_or(rest);
        let full = if path.is_empty() || path == "." { name.to_string() } else { path.to_string() };
        return format!("Parameter '{full}' is unexpected");
    }
    if let Some(rest) = msg.strip_prefix("invalid type: ") {
        let expected = rest.rsplit(", expected ").next().unwrap_or(rest);
        return format!("Invalid parameter type for '{path}', expected: {}", simplify_expected(expected));
    }
    if let Some(rest) = msg.strip_prefix("invalid value: ") {
        return format!("Invalid value for '{path}': {rest}");
    }
    if msg.starts_with("unknown variant `") {
        let value = msg.trim_start_matches("unknown variant `").split('`').next().unwrap_or("");
        return format!("Parameter '{path}' does not accept value '{value}'");
    }
    if path.is_empty() || path == "." { msg.to_string() } else { format!("{path}: {msg}") }
}

fn simplify_expected(expected: &str) -> &str {
    match expected {
        "u64" | "u32" | "u16" | "u8" | "i64" | "i32" | "usize" => "integer",
        "a boolean" => "boolean",
        "a string" => "string",
        "a map" | "struct" => "object",
        "a sequence" => "array",
        other => other,
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
        assert_eq!(msg(json!({"node-name": 5})), "Invalid parameter type for 'node-name', expected: string");
        assert_eq!(
            msg(json!({"node-name": "a", "size": "big"})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert_eq!(msg(json!({"node-name": "a", "size": -1})), "Invalid value for 'size': integer `-1`, expected u64");
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
}
