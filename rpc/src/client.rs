//! A blocking JSON-RPC client: what `spindle rpc` and the tests use.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::framing::{Frame, Framer};

/// Largest answer the client accepts (answers can be far larger than requests).
const ANSWER_BYTES_MAX: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {path}: {source} (is the daemon running?)")]
    Connect { path: String, source: std::io::Error },
    #[error("{message} (code {code})")]
    Rpc { code: i64, message: String, data: Option<Value> },
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// One connection to a daemon's JSON-RPC socket.
pub struct Client {
    stream: UnixStream,
    framer: Framer,
    next_id: u64,
    timeout: Duration,
}

impl Client {
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|source| ClientError::Connect { path: path.display().to_string(), source })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Client { stream, framer: Framer::with_limit(ANSWER_BYTES_MAX), next_id: 1, timeout })
    }

    /// Sends one request and waits for its answer, skipping notifications.
    pub fn call(&mut self, method: &str, params: Option<Value>) -> Result<Value, ClientError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        // The timeout covers the whole call, however the answer trickles in.
        let deadline = std::time::Instant::now() + self.timeout;
        self.stream.write_all(req.to_string().as_bytes())?;
        loop {
            let v = self.next_value(deadline)?;
            if v.get("id") != Some(&json!(id)) {
                // An event notification (or someone else's answer): not ours.
                continue;
            }
            if let Some(err) = v.get("error") {
                return Err(ClientError::Rpc {
                    code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                    message: err.get("message").and_then(Value::as_str).unwrap_or("").to_string(),
                    data: err.get("data").cloned(),
                });
            }
            return v
                .get("result")
                .cloned()
                .ok_or_else(|| ClientError::Protocol(format!("answer without result: {v}")));
        }
    }

    fn next_value(&mut self, deadline: std::time::Instant) -> Result<Value, ClientError> {
        let mut chunk = [0u8; 16 << 10];
        loop {
            match self.framer.next_frame() {
                Frame::Value(v) => return Ok(v),
                Frame::Syntax(e) => {
                    return Err(ClientError::Protocol(format!("unparsable answer: {e}")));
                }
                Frame::TooLarge => return Err(ClientError::Protocol("answer too large".into())),
                Frame::Incomplete => {}
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(ClientError::Timeout(self.timeout));
            }
            self.stream.set_read_timeout(Some(left))?;
            let n = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Ok(0) => {
                    return Err(ClientError::Protocol("the daemon closed the connection".into()));
                }
                Ok(n) => n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return Err(ClientError::Timeout(self.timeout));
                }
                Err(e) => return Err(e.into()),
            };
            self.framer.push(&chunk[..n]);
        }
    }
}

/// Command-line params: one JSON object (or array) argument, or `key=value`
/// pairs. Values that parse as JSON are JSON, others strings; dotted keys
/// nest (`cache.direct=true` → `{"cache": {"direct": true}}`).
pub fn parse_cli_params(args: &[String]) -> Result<Option<Value>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    if let [one] = args
        && let Ok(v @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str::<Value>(one)
    {
        return Ok(Some(v));
    }
    let mut root = Map::new();
    for arg in args {
        let (key, raw) = arg.split_once('=').ok_or_else(|| format!("'{arg}' is not key=value (or a JSON object)"))?;
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("'{arg}': empty key"));
        }
        let value = serde_json::from_str::<Value>(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
        insert_dotted(&mut root, key, value)?;
    }
    Ok(Some(Value::Object(root)))
}

fn insert_dotted(root: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    let mut parts = key.split('.').peekable();
    let mut map = root;
    let mut path = String::new();
    while let Some(part) = parts.next() {
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(part);
        if parts.peek().is_none() {
            if map.contains_key(part) {
                return Err(format!("key '{path}' given twice"));
            }
            map.insert(part.to_string(), value);
            return Ok(());
        }
        let entry = map.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => return Err(format!("key '{path}' is both a value and an object")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Option<Value>, String> {
        parse_cli_params(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn key_values() {
        assert_eq!(p(&[]).unwrap(), None);
        assert_eq!(
            p(&["driver=file", "size=1048576", "read-only=true", "filename=/tmp/a.img", "x={\"a\":1}"])
                .unwrap()
                .unwrap(),
            json!({"driver": "file", "size": 1048576, "read-only": true, "filename": "/tmp/a.img", "x": {"a": 1}})
        );
        assert_eq!(
            p(&["cache.direct=true", "file.driver=file", "file.filename=/x"]).unwrap().unwrap(),
            json!({"cache": {"direct": true}, "file": {"driver": "file", "filename": "/x"}})
        );
        assert_eq!(p(&["command=write -P 0xab 0 64k"]).unwrap().unwrap(), json!({"command": "write -P 0xab 0 64k"}));
        assert_eq!(p(&["{\"a\": 1}"]).unwrap().unwrap(), json!({"a": 1}));
    }

    #[test]
    fn mistakes() {
        assert!(p(&["a=1", "a=2"]).unwrap_err().contains("given twice"));
        assert!(p(&["a=1", "a.b=2"]).unwrap_err().contains("both a value and an object"));
        assert!(p(&["novalue"]).unwrap_err().contains("not key=value"));
        assert!(p(&["=1"]).unwrap_err().contains("empty key"));
        assert!(p(&["a..b=1"]).unwrap_err().contains("empty key"));
    }
}
