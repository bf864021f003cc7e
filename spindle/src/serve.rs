//! `spindle serve`: start reactors, replay the configuration, serve
//! JSON-RPC (and QMP), run the control loop, shut down cleanly.
//!
//! Shutdown order (on `quit`, SIGINT or SIGTERM): stop taking commands,
//! flush and close every node (parents first), stop the reactors, remove
//! the sockets, exit 0. A second signal exits at once.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use reactor::{PollMode, ReactorOptions, Reactors};
use rpc::control::{Control, ControlSender, ShutdownReason, control_channel, run_control_loop};
use rpc::{EventBus, Server, ServerConfig, ServerInfo};
use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};
use tracing_subscriber::EnvFilter;

/// Connections each socket accepts at once.
const RPC_CONNECTIONS_MAX: usize = 64;

#[derive(Args)]
pub struct ServeArgs {
    /// Cores to run reactors on: a hex mask (0x3) or a list ([0,2-3]). Default: every core available.
    #[arg(long, short = 'm')]
    cpumask: Option<String>,
    /// How idle reactors wait: adaptive (spin briefly, then sleep), poll (always spin), interrupt (sleep at once).
    #[arg(long, default_value = "adaptive")]
    poll_mode: PollMode,
    /// Adaptive mode: microseconds a reactor spins idle before it sleeps.
    #[arg(long, default_value_t = 50)]
    idle_spin_us: u64,
    /// Do not pin reactor threads to their cores.
    #[arg(long)]
    no_pin: bool,
    /// JSON-RPC socket.
    #[arg(long, short = 'r', default_value = "spindle.sock")]
    rpc_socket: PathBuf,
    /// QMP socket (off unless given).
    #[arg(long)]
    qmp_socket: Option<PathBuf>,
    /// A JSON list of {"method": .., "params": ..} to run at start (the output of save_config).
    #[arg(long, short = 'c')]
    config: Option<PathBuf>,
    /// A node to open at start (blockdev-add options as JSON or QEMU keyval:
    /// driver=file,node-name=f0,filename=/x). Repeatable; after --config.
    #[arg(long = "blockdev", value_name = "OPTIONS")]
    blockdevs: Vec<String>,
    /// Start the NBD server (addr.type=inet,addr.host=127.0.0.1,addr.port=10809
    /// or addr.type=unix,addr.path=/run/nbd.sock; max-connections=N).
    #[arg(long, value_name = "OPTIONS")]
    nbd_server: Option<String>,
    /// An export to add at start (type=nbd,id=e0,node-name=disk,name=disk0,writable=on). Repeatable.
    #[arg(long = "export", value_name = "OPTIONS")]
    exports: Vec<String>,
    /// Log filter: error, warn, info, debug, trace, or per-module directives (spindle=debug,bdev=trace).
    #[arg(long, default_value = "info")]
    log_level: String,
}

pub fn server_info() -> ServerInfo {
    let v = env!("CARGO_PKG_VERSION");
    let mut parts = v.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    ServerInfo {
        major: parts.next().unwrap_or(0),
        minor: parts.next().unwrap_or(0),
        micro: parts.next().unwrap_or(0),
        package: format!("spindle {v}"),
    }
}

/// Logs to stderr at `level` (an env-filter directive), colours on a terminal.
pub(crate) fn init_logging(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level '{level}': {e}"))?;
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    Ok(())
}

/// Runs the entries of a configuration file; the first failure is fatal and named.
fn replay_config(ctl: &mut Control, registry: &rpc::Registry<Control>, path: &PathBuf) -> Result<usize, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config '{}': {e}", path.display()))?;
    let entries: Vec<Value> = match serde_json::from_str(&text) {
        Ok(Value::Array(a)) => a,
        Ok(_) => {
            return Err(format!(
                "config '{}' must be a JSON list of {{\"method\", \"params\"}} objects",
                path.display()
            ));
        }
        Err(e) => {
            return Err(format!("config '{}' is not valid JSON: {e}", path.display()));
        }
    };
    for (i, entry) in entries.iter().enumerate() {
        let n = i + 1;
        let Some(method) = entry.get("method").and_then(Value::as_str) else {
            return Err(format!("config entry {n}: 'method' must be a string"));
        };
        let params = entry.get("params").cloned();
        registry.call(ctl, method, params).map_err(|e| format!("config entry {n} ({method}): {e}"))?;
    }
    Ok(entries.len())
}

/// Runs the --blockdev, --nbd-server and --export options, in that order.
fn apply_command_line(ctl: &mut Control, registry: &rpc::Registry<Control>, args: &ServeArgs) -> Result<(), String> {
    let mut calls: Vec<(&str, &str, &String)> = Vec::new();
    calls.extend(args.blockdevs.iter().map(|b| ("--blockdev", "blockdev-add", b)));
    calls.extend(args.nbd_server.iter().map(|n| ("--nbd-server", "nbd-server-start", n)));
    calls.extend(args.exports.iter().map(|e| ("--export", "block-export-add", e)));
    for (flag, method, text) in calls {
        let params = crate::keyval::parse(text).map_err(|e| format!("{flag}: {e}"))?;
        registry.call(ctl, method, Some(params)).map_err(|e| format!("{flag} {text}: {e}"))?;
    }
    Ok(())
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: exit at once.
fn watch_signals(control: ControlSender) -> std::io::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0;
        for sig in signals.forever() {
            seen += 1;
            if seen == 1 {
                tracing::info!(signal = sig, "shutting down (send again to force)");
                control.shutdown(ShutdownReason::Signal);
            } else {
                eprintln!("spindle: second signal, exiting without cleanup");
                std::process::exit(1);
            }
        }
    })?;
    Ok(())
}

pub fn run(args: ServeArgs) -> ExitCode {
    if let Err(e) = init_logging(&args.log_level) {
        eprintln!("spindle: {e}");
        return ExitCode::from(2);
    }
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("spindle: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let cores = match &args.cpumask {
        Some(mask) => reactor::cpuset::parse_cpumask(mask).map_err(|e| e.to_string())?,
        None => reactor::cpuset::allowed_cores().map_err(|e| e.to_string())?,
    };
    let options = ReactorOptions {
        poll_mode: args.poll_mode,
        idle_spin: Duration::from_micros(args.idle_spin_us),
        ..Default::default()
    };
    let mut reactors = Reactors::start(&cores, !args.no_pin, options).map_err(|e| e.to_string())?;
    tracing::info!(cores = ?cores, poll_mode = %args.poll_mode, "reactors running");

    let events = Arc::new(EventBus::new());
    let info = server_info();
    let registry = rpc::methods::registry();
    let mut ctl = Control::new(reactors.handles().to_vec(), Arc::clone(&events), info.clone());
    ctl.command_names = registry.commands().map(|c| c.name).collect();

    let result = (|| {
        if let Some(path) = &args.config {
            let n = replay_config(&mut ctl, &registry, path)?;
            tracing::info!(entries = n, config = %path.display(), "configuration replayed");
        }
        apply_command_line(&mut ctl, &registry, &args)?;
        let (sender, rx) = control_channel();
        let cfg = ServerConfig {
            jsonrpc_socket: Some(args.rpc_socket.clone()),
            qmp_socket: args.qmp_socket.clone(),
            info,
            connections_max: RPC_CONNECTIONS_MAX,
        };
        let mut server =
            Server::start(cfg, Arc::new(sender.clone()), Arc::clone(&events)).map_err(|e| e.to_string())?;
        tracing::info!(rpc = %args.rpc_socket.display(), qmp = ?args.qmp_socket, "listening");
        watch_signals(sender).map_err(|e| format!("installing signal handlers failed: {e}"))?;
        let reason = run_control_loop(&mut ctl, &registry, rx);
        tracing::info!(?reason, "stopping");
        server.shutdown();
        Ok(())
    })();
    ctl.stop_jobs();
    ctl.stop_nbd();
    ctl.graph.close_all();
    reactors.stop();
    tracing::info!("stopped");
    result
}
