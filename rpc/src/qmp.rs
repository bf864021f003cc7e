//! The QEMU Machine Protocol, as QEMU 10 speaks it: greeting, capability
//! negotiation, `execute`/`return`/`error`, events with timestamps. Pure
//! functions; the socket handling is in `server`.

use serde_json::{Value, json};

use crate::error::{RpcError, qmp_class};
use crate::event::Event;
use crate::server::Dispatcher;

/// Version facts for the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerInfo {
    pub major: u64,
    pub minor: u64,
    pub micro: u64,
    pub package: String,
}

/// The first line a client reads.
pub fn greeting(info: &ServerInfo) -> Value {
    json!({"QMP": {"version": {"qemu": {"major": info.major, "minor": info.minor, "micro": info.micro}, "package": info.package}, "capabilities": []}})
}

fn error(class: &str, desc: impl Into<String>) -> Value {
    json!({"error": {"class": class, "desc": desc.into()}})
}

fn generic(desc: impl Into<String>) -> Value {
    error("GenericError", desc)
}

/// The reply to an unparsable or refused line; `message` comes from the
/// framer, already in QEMU's words.
pub fn parse_error(message: &str) -> Value {
    generic(message)
}

/// One session's negotiation state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// Handles one received value and returns the reply.
    pub fn handle(&mut self, dispatcher: &dyn Dispatcher, value: Value) -> Value {
        let Value::Object(mut req) = value else {
            return generic("QMP input must be a JSON object");
        };
        let id = req.remove("id");
        let mut reply = self.execute(dispatcher, req);
        if let Some(id) = id {
            reply["id"] = id;
        }
        reply
    }

    fn execute(&mut self, dispatcher: &dyn Dispatcher, mut req: serde_json::Map<String, Value>) -> Value {
        if let Some(k) = req.keys().find(|k| !matches!(k.as_str(), "execute" | "arguments" | "exec-oob")) {
            return generic(format!("QMP input member '{k}' is unexpected"));
        }
        if req.contains_key("exec-oob") {
            return generic("Out-of-band execution is not supported (no 'oob' capability)");
        }
        let command = match req.remove("execute") {
            None => return generic("QMP input lacks member 'execute'"),
            Some(Value::String(s)) => s,
            Some(_) => return generic("QMP input member 'execute' must be a string"),
        };
        let args = match req.remove("arguments") {
            None => None,
            Some(v @ Value::Object(_)) => Some(v),
            Some(_) => return generic("QMP input member 'arguments' must be an object"),
        };
        if command == "qmp_capabilities" {
            return self.negotiate(args);
        }
        if !self.negotiated {
            return error("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
        }
        match dispatcher.dispatch(&command, args) {
            Ok(v) => json!({"return": v}),
            Err(e) => error(qmp_class(e.kind), e.message),
        }
    }

    fn negotiate(&mut self, args: Option<Value>) -> Value {
        if self.negotiated {
            return error("CommandNotFound", "Capabilities negotiation is already complete, command ignored");
        }
        if let Some(Value::Object(mut a)) = args {
            if let Some(enable) = a.remove("enable") {
                match enable {
                    Value::Array(caps) => {
                        if let Some(c) = caps.first() {
                            return generic(format!("Capability '{}' not available", c.as_str().unwrap_or("?")));
                        }
                    }
                    _ => return generic("Invalid parameter type for 'enable', expected: array"),
                }
            }
            if let Some(k) = a.keys().next() {
                return generic(format!("Parameter '{k}' is unexpected"));
            }
        }
        self.negotiated = true;
        json!({"return": {}})
    }
}

/// An event in QMP's shape.
pub fn event_message(event: &Event) -> Value {
    json!({"event": event.name, "data": event.data, "timestamp": event.timestamp_json()})
}

/// Reply for errors the dispatcher raised outside a session (kept for symmetry).
pub fn error_reply(err: &RpcError) -> Value {
    error(qmp_class(err.kind), err.message.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct D;
    impl Dispatcher for D {
        fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(params.unwrap_or(json!({}))),
                "missing" => Err(RpcError::not_found("gone")),
                _ => Err(RpcError::method_not_found(method)),
            }
        }
    }

    #[test]
    fn greeting_shape() {
        let g = greeting(&ServerInfo { major: 0, minor: 1, micro: 2, package: "spindle 0.1.2".into() });
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"major": 0, "minor": 1, "micro": 2}, "package": "spindle 0.1.2"}, "capabilities": []}})
        );
    }

    #[test]
    fn negotiation() {
        let mut s = Session::default();
        let r = s.handle(&D, json!({"execute": "echo"}));
        assert_eq!(
            r,
            json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}})
        );
        let r = s.handle(&D, json!({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}));
        assert_eq!(r["error"]["desc"], "Capability 'oob' not available");
        assert!(!s.negotiated());
        assert_eq!(s.handle(&D, json!({"execute": "qmp_capabilities", "id": 1})), json!({"return": {}, "id": 1}));
        let r = s.handle(&D, json!({"execute": "qmp_capabilities"}));
        assert_eq!(r["error"]["desc"], "Capabilities negotiation is already complete, command ignored");
        assert_eq!(
            s.handle(&D, json!({"execute": "echo", "arguments": {"a": 1}, "id": "x"})),
            json!({"return": {"a": 1}, "id": "x"})
        );
        assert_eq!(s.handle(&D, json!({"execute": "missing"}))["error"]["class"], "DeviceNotFound");
        assert_eq!(s.handle(&D, json!({"execute": "nope"}))["error"]["class"], "CommandNotFound");
    }

    #[test]
    fn input_errors_use_qemu_wording() {
        let mut s = Session::default();
        let cases = [
            (json!([1]), "QMP input must be a JSON object"),
            (json!({"foo": 1}), "QMP input member 'foo' is unexpected"),
            (json!({"arguments": {}}), "QMP input lacks member 'execute'"),
            (json!({"execute": 1}), "QMP input member 'execute' must be a string"),
            (json!({"execute": "echo", "arguments": []}), "QMP input member 'arguments' must be an object"),
        ];
        for (req, desc) in cases {
            assert_eq!(s.handle(&D, req.clone()), json!({"error": {"class": "GenericError", "desc": desc}}), "{req}");
        }
        assert!(s.handle(&D, json!({"exec-oob": "echo"}))["error"]["desc"].as_str().unwrap().contains("Out-of-band"));
        assert_eq!(
            parse_error(crate::framing::DUPLICATE_KEY),
            json!({"error": {"class": "GenericError", "desc": "JSON parse error, duplicate key"}})
        );
    }
}
