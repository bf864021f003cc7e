//! JSON-RPC 2.0 as SPDK serves it: a stream of requests (objects, or arrays
//! for batches), one reply object (or array) per line, events as
//! notifications. Pure functions; the socket handling is in `server`.

use serde_json::{Map, Value, json};

use crate::error::{RpcError, json_rpc_code, qmp_class};
use crate::event::Event;
use crate::server::Dispatcher;

/// Requests one batch may hold.
pub const BATCH_REQUESTS_MAX: usize = 128;

const MEMBERS: [&str; 4] = ["jsonrpc", "method", "params", "id"];

/// The error reply for `id`.
pub fn error_reply(id: Value, err: &RpcError) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": json_rpc_code(err.kind), "message": err.message, "data": {"class": qmp_class(err.kind)}},
    })
}

/// The reply to a parse error (the connection closes after it).
pub fn parse_error_reply(message: &str) -> Value {
    error_reply(Value::Null, &RpcError::parse_error(message))
}

/// Handles one received value (a request or a batch); None when nothing is
/// to be answered (notifications).
pub fn handle_value(dispatcher: &dyn Dispatcher, value: Value) -> Option<Value> {
    match value {
        Value::Array(batch) if batch.is_empty() => {
            Some(error_reply(Value::Null, &RpcError::invalid_request("empty batch")))
        }
        Value::Array(batch) if batch.len() > BATCH_REQUESTS_MAX => Some(error_reply(
            Value::Null,
            &RpcError::invalid_request(format!("a batch holds at most {BATCH_REQUESTS_MAX} requests")),
        )),
        Value::Array(batch) => {
            let replies: Vec<Value> = batch.into_iter().filter_map(|r| handle_request(dispatcher, r)).collect();
            (!replies.is_empty()).then_some(Value::Array(replies))
        }
        other => handle_request(dispatcher, other),
    }
}

/// Validates one request; Err carries the id to answer with (when readable).
fn check(req: &Map<String, Value>) -> Result<(), RpcError> {
    if let Some(k) = req.keys().find(|k| !MEMBERS.contains(&k.as_str())) {
        return Err(RpcError::invalid_request(format!("unexpected member '{k}'")));
    }
    match req.get("jsonrpc") {
        None => {}
        Some(Value::String(v)) if v == "2.0" => {}
        Some(_) => return Err(RpcError::invalid_request("'jsonrpc' must be \"2.0\"")),
    }
    if !matches!(req.get("method"), Some(Value::String(_))) {
        return Err(RpcError::invalid_request("'method' must be a string"));
    }
    match req.get("params") {
        None | Some(Value::Null) | Some(Value::Object(_)) | Some(Value::Array(_)) => Ok(()),
        Some(_) => Err(RpcError::invalid_request("'params' must be an object or an array")),
    }
}

fn handle_request(dispatcher: &dyn Dispatcher, value: Value) -> Option<Value> {
    let Value::Object(mut req) = value else {
        return Some(error_reply(Value::Null, &RpcError::invalid_request("a request must be a JSON object")));
    };
    let id = match req.get("id") {
        None => None,
        Some(v @ (Value::String(_) | Value::Number(_) | Value::Null)) => Some(v.clone()),
        Some(_) => {
            return Some(error_reply(
                Value::Null,
                &RpcError::invalid_request("'id' must be a string, a number or null"),
            ));
        }
    };
    if let Err(e) = check(&req) {
        return Some(error_reply(id.unwrap_or(Value::Null), &e));
    }
    let Some(Value::String(method)) = req.remove("method") else { unreachable!("checked above") };
    let params = req.remove("params").filter(|p| !p.is_null());
    let result = dispatcher.dispatch(&method, params);
    let id = id?;
    Some(match result {
        Ok(v) => json!({"jsonrpc": "2.0", "id": id, "result": v}),
        Err(e) => error_reply(id, &e),
    })
}

/// An event as a notification: its data plus a `timestamp` member.
pub fn event_notification(event: &Event) -> Value {
    let mut params = match &event.data {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("data".into(), other.clone());
            m
        }
    };
    params.insert("timestamp".into(), event.timestamp_json());
    json!({"jsonrpc": "2.0", "method": event.name, "params": params})
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl Dispatcher for Echo {
        fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
            match method {
                "echo" => Ok(params.unwrap_or(Value::Null)),
                "missing" => Err(RpcError::not_found("no such node")),
                _ => Err(RpcError::method_not_found(method)),
            }
        }
    }

    fn h(v: Value) -> Option<Value> {
        handle_value(&Echo, v)
    }

    #[test]
    fn single_requests_and_ids() {
        for id in [json!(1), json!("a"), json!(null)] {
            let r = h(json!({"jsonrpc": "2.0", "id": id, "method": "echo", "params": {"x": 1}})).unwrap();
            assert_eq!(r, json!({"jsonrpc": "2.0", "id": id, "result": {"x": 1}}));
        }
        // jsonrpc may be omitted, as SPDK allows.
        assert_eq!(h(json!({"id": 2, "method": "echo"})).unwrap()["result"], Value::Null);
        // Notifications run but get no reply.
        assert_eq!(h(json!({"jsonrpc": "2.0", "method": "echo"})), None);
    }

    #[test]
    fn errors() {
        let r = h(json!({"id": 1, "method": "nope"})).unwrap();
        assert_eq!(
            r["error"],
            json!({"code": -32601, "message": "The command nope has not been found", "data": {"class": "CommandNotFound"}})
        );
        let r = h(json!({"id": 1, "method": "missing"})).unwrap();
        assert_eq!(r["error"]["code"], -19);
        assert_eq!(r["error"]["data"]["class"], "DeviceNotFound");
        let cases = [
            (json!(5), "a request must be a JSON object"),
            (json!({"id": 1, "method": 5}), "'method' must be a string"),
            (json!({"id": 1}), "'method' must be a string"),
            (json!({"id": 1, "jsonrpc": "1.0", "method": "echo"}), "'jsonrpc' must be \"2.0\""),
            (json!({"id": 1, "method": "echo", "params": 3}), "'params' must be an object or an array"),
            (json!({"id": 1, "method": "echo", "extra": 3}), "unexpected member 'extra'"),
            (json!({"id": {}, "method": "echo"}), "'id' must be a string, a number or null"),
        ];
        for (req, msg) in cases {
            let r = h(req.clone()).unwrap();
            assert_eq!(r["error"]["code"], -32600, "{req}");
            assert_eq!(r["error"]["message"], msg, "{req}");
        }
        assert_eq!(h(json!({"id": 9, "method": 1})).unwrap()["id"], 9, "the id is echoed when readable");
        assert_eq!(parse_error_reply("bad")["error"]["code"], -32700);
    }

    #[test]
    fn batches() {
        let r = h(json!([
            {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": [1]},
            {"jsonrpc": "2.0", "method": "echo"},
            {"jsonrpc": "2.0", "id": 2, "method": "nope"},
            7
        ]))
        .unwrap();
        let r = r.as_array().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0]["result"], json!([1]));
        assert_eq!(r[1]["error"]["code"], -32601);
        assert_eq!(r[2]["error"]["code"], -32600);
        assert_eq!(h(json!([{"method": "echo"}, {"method": "echo"}])), None);
        assert_eq!(h(json!([])).unwrap()["error"]["code"], -32600);
        let big: Vec<Value> = (0..=BATCH_REQUESTS_MAX).map(|i| json!({"id": i, "method": "echo"})).collect();
        assert_eq!(h(Value::Array(big)).unwrap()["error"]["code"], -32600);
    }

    #[test]
    fn notifications_carry_a_timestamp() {
        let e = Event { name: "SHUTDOWN".into(), data: json!({"guest": false}), timestamp: std::time::UNIX_EPOCH };
        assert_eq!(
            event_notification(&e),
            json!({"jsonrpc": "2.0", "method": "SHUTDOWN", "params": {"guest": false, "timestamp": {"seconds": 0, "microseconds": 0}}})
        );
    }
}
