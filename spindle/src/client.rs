//! `spindle rpc METHOD [PARAMS]`: one command to a running daemon.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use rpc::client::{Client, ClientError, parse_cli_params};
use serde_json::Value;

#[derive(Args)]
pub struct RpcArgs {
    /// The daemon's JSON-RPC socket.
    #[arg(long, short = 's', default_value = "spindle.sock")]
    socket: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(long, short = 't', default_value_t = 60)]
    timeout: u64,
    /// List the daemon's commands.
    #[arg(long, conflicts_with = "method")]
    list: bool,
    /// The command, e.g. blockdev-add.
    #[arg(required_unless_present = "list")]
    method: Option<String>,
    /// Params: one JSON object, or key=value pairs (dotted keys nest: cache.direct=true).
    params: Vec<String>,
}

pub fn run(args: RpcArgs) -> ExitCode {
    let (method, params) = if args.list {
        ("rpc_get_methods".to_string(), None)
    } else {
        let method = args.method.clone().unwrap_or_default();
        match parse_cli_params(&args.params) {
            Ok(p) => (method, p),
            Err(e) => {
                eprintln!("spindle rpc: {e}");
                return ExitCode::from(2);
            }
        }
    };
    let timeout = Duration::from_secs(args.timeout);
    let mut client = match Client::connect(&args.socket, timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("spindle rpc: {e}");
            return ExitCode::from(2);
        }
    };
    match client.call(&method, params) {
        Ok(v) => {
            print_value(&v, args.list);
            ExitCode::SUCCESS
        }
        Err(ClientError::Rpc { code, message, data }) => {
            let mut err = serde_json::json!({"code": code, "message": message});
            if let Some(d) = data {
                err["data"] = d;
            }
            eprintln!("{}", serde_json::to_string_pretty(&err).unwrap_or_default());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("spindle rpc: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_value(v: &Value, list: bool) {
    match (v, list) {
        (Value::Array(names), true) => {
            for n in names {
                println!("{}", n.as_str().unwrap_or_default());
            }
        }
        // qemu-io style text output (x-debug-io) prints as is.
        (Value::String(s), _) => print!("{s}"),
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}
