//! JSON-RPC and QMP message handling: the stream framer fed the input in
//! pieces, then every framed value through both protocols' request
//! handling with a dispatcher that answers without side effects.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rpc::framing::{Frame, Framer};
use rpc::qmp::Session;
use rpc::{Dispatcher, RpcError, jsonrpc};
use serde_json::Value;

struct Echo;

impl Dispatcher for Echo {
    fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        match method {
            "fail" => Err(RpcError::not_found("nothing")),
            _ => Ok(params.unwrap_or(Value::Null)),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let piece = usize::from(ctl).max(1);
    let mut framer = Framer::new();
    let mut session = Session::default();
    for chunk in rest.chunks(piece) {
        framer.push(chunk);
        loop {
            match framer.next_frame() {
                Frame::Value(v) => {
                    let _ = jsonrpc::handle_value(&Echo, v.clone());
                    let _ = session.handle(&Echo, v);
                }
                Frame::Incomplete => break,
                Frame::Syntax(_) | Frame::TooLarge => {
                    framer.skip_line();
                }
            }
        }
    }
});
