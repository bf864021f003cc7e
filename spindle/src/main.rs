//! `spindle`: the daemon (`serve`), its command-line client (`rpc`) and
//! the benchmark (`perf`).

#![forbid(unsafe_code)]

mod client;
mod keyval;
mod perf;
mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "spindle", version, about = "A polled-mode block storage daemon with live block jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve(serve::ServeArgs),
    /// Send one command to a running daemon and print the answer.
    Rpc(client::RpcArgs),
    /// Measure a node's latency and throughput, bdevperf style (in this process or in a daemon).
    Perf(perf::PerfArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Rpc(args) => client::run(args),
        Command::Perf(args) => perf::run(args),
    }
}
