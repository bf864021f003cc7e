//! The control plane: one thread that owns the daemon's state (the node
//! graph, later exports and jobs) and runs every command, one at a time —
//! the role of QEMU's main loop. Transports hand it commands through
//! [`ControlSender`] and block until the answer comes back; reactors never
//! wait for it.

use std::collections::BTreeMap;
use std::sync::Arc;

use bdev::{BdevError, Graph};
use crossbeam_channel::{Receiver, Sender, bounded, select, unbounded};
use jobs::JobManager;
use nbd::server::{Exports, NbdServer};
use reactor::Handle;
use serde_json::{Value, json};

use crate::error::RpcError;
use crate::event::EventBus;
use crate::qmp::ServerInfo;
use crate::registry::Registry;
use crate::server::Dispatcher;

/// How long shutdown waits for cancelled jobs to end.
const JOBS_STOP_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Why the daemon stops, as QEMU's SHUTDOWN event names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// The `quit` command.
    Quit,
    /// SIGINT or SIGTERM.
    Signal,
}

impl ShutdownReason {
    fn qemu_name(self) -> &'static str {
        match self {
            ShutdownReason::Quit => "host-qmp-quit",
            ShutdownReason::Signal => "host-signal",
        }
    }
}

/// What the control plane remembers of an export.
pub struct ExportRecord {
    pub name: String,
    /// What the export serves (a job may move it to another node).
    pub backend: Arc<bdev::Backend>,
    /// The `block-export-add` arguments (for `save_config`).
    pub config: Value,
}

/// The state commands act on.
pub struct Control {
    pub graph: Graph,
    pub reactors: Vec<Handle>,
    pub events: Arc<EventBus>,
    pub info: ServerInfo,
    /// Names of every registered command (for `query-commands`).
    pub command_names: Vec<&'static str>,
    /// The NBD server and the `nbd-server-start` arguments that started it.
    pub nbd: Option<(NbdServer, Value)>,
    /// Exports connections look up by name.
    pub exports: Arc<Exports>,
    /// Exports by id.
    pub export_records: BTreeMap<String, ExportRecord>,
    /// Block jobs.
    pub jobs: JobManager,
    /// Objects (`object-add`).
    pub objects: crate::objects::Objects,
    /// Nodes placed by `x-blockdev-set-iothread`: the iothread (None: the
    /// main reactor), replayed by `save_config`.
    pub placements: BTreeMap<String, Option<String>>,
    shutdown: Option<ShutdownReason>,
}

impl Control {
    pub fn new(reactors: Vec<Handle>, events: Arc<EventBus>, info: ServerInfo) -> Control {
        let mut graph = Graph::new(reactors.clone());
        // The NBD client lives in the nbd crate, above the device layer.
        graph.register_driver(nbd::client::DRIVER_NAME, nbd::client::open);
        let bus = Arc::clone(&events);
        graph.set_events(Arc::new(move |name: &str, data: Value| bus.emit(name, data)));
        let bus = Arc::clone(&events);
        let jobs = JobManager::new(reactors[0].clone(), Arc::new(move |name: &str, data: Value| bus.emit(name, data)));
        Control {
            graph,
            reactors,
            events,
            info,
            command_names: Vec::new(),
            nbd: None,
            exports: Arc::new(Exports::new()),
            export_records: BTreeMap::new(),
            jobs,
            objects: Default::default(),
            placements: BTreeMap::new(),
            shutdown: None,
        }
    }

    /// Cancels every job and waits for them to end (daemon shutdown).
    pub fn stop_jobs(&mut self) {
        self.jobs.cancel_all(&mut self.graph, JOBS_STOP_LIMIT);
    }

    /// Stops the NBD server: no new connections, the existing ones end
    /// after their requests, every export goes (with its event).
    pub fn stop_nbd(&mut self) {
        let Some((server, _)) = self.nbd.take() else { return };
        for r in self.export_records.values() {
            self.exports.remove(&r.name);
        }
        server.stop();
        for id in std::mem::take(&mut self.export_records).into_keys() {
            self.events.emit("BLOCK_EXPORT_DELETED", json!({"id": id}));
        }
    }

    /// The commands that rebuild the current state: nodes, then the NBD
    /// server and its exports.
    pub fn save_config(&self) -> Vec<Value> {
        let mut cfg = self.objects.save_config();
        cfg.extend(self.graph.save_config());
        for (node, iothread) in &self.placements {
            if self.graph.get(node).is_ok() {
                cfg.push(
                    json!({"method": "x-blockdev-set-iothread", "params": {"node-name": node, "iothread": iothread}}),
                );
            }
        }
        if let Some((_, start)) = &self.nbd {
            cfg.push(json!({"method": "nbd-server-start", "params": start}));
            for r in self.export_records.values() {
                let mut params = r.config.clone();
                // A finished mirror or commit moved the export to another node.
                params["node-name"] = json!(r.backend.root().name());
                // Dirty bitmaps live in memory only: none exists when the
                // configuration is replayed, so the export comes back
                // without them rather than failing the start.
                if let Some(p) = params.as_object_mut() {
                    p.remove("bitmaps");
                }
                cfg.push(json!({"method": "block-export-add", "params": params}));
            }
        }
        cfg
    }

    /// Asks the control loop to stop after the current command.
    pub fn request_shutdown(&mut self, reason: ShutdownReason) {
        self.shutdown.get_or_insert(reason);
    }

    pub fn shutdown_requested(&self) -> Option<ShutdownReason> {
        self.shutdown
    }

    /// The main reactor: where control-plane I/O runs.
    pub fn main_reactor(&self) -> &Handle {
        &self.reactors[0]
    }
}

/// A request for the control thread.
pub enum ControlMsg {
    Call { method: String, params: Option<Value>, reply: Sender<Result<Value, RpcError>> },
    Shutdown(ShutdownReason),
}

/// Sends commands to the control thread; the transports' [`Dispatcher`].
#[derive(Clone)]
pub struct ControlSender(Sender<ControlMsg>);

/// A control channel: the sender for transports and signal handlers, the
/// receiver for [`run_control_loop`].
pub fn control_channel() -> (ControlSender, Receiver<ControlMsg>) {
    let (tx, rx) = unbounded();
    (ControlSender(tx), rx)
}

impl ControlSender {
    /// Asks for a graceful shutdown (from a signal handler thread).
    pub fn shutdown(&self, reason: ShutdownReason) {
        let _ = self.0.send(ControlMsg::Shutdown(reason));
    }
}

impl Dispatcher for ControlSender {
    fn dispatch(&self, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
        let (tx, rx) = bounded(1);
        self.0
            .send(ControlMsg::Call { method: method.to_string(), params, reply: tx })
            .map_err(|_| RpcError::failed("the daemon is shutting down"))?;
        rx.recv().unwrap_or_else(|_| Err(RpcError::failed("the daemon is shutting down")))
    }
}

/// Runs commands until a shutdown is requested; returns why. Commands still
/// queued at that point are refused.
pub fn run_control_loop(ctl: &mut Control, registry: &Registry<Control>, rx: Receiver<ControlMsg>) -> ShutdownReason {
    let reason = loop {
        let finished = ctl.jobs.finished().clone();
        let msg = select! {
            recv(rx) -> msg => msg,
            recv(finished) -> done => {
                if let Ok((id, result)) = done {
                    ctl.jobs.on_finished(&mut ctl.graph, &id, result);
                }
                continue;
            }
        };
        let Ok(msg) = msg else {
            break ShutdownReason::Signal;
        };
        match msg {
            ControlMsg::Call { method, params, reply } => {
                tracing::debug!(%method, "command");
                let result = registry.call(ctl, &method, params);
                if let Err(e) = &result {
                    tracing::debug!(%method, error = %e, "command failed");
                }
                let _ = reply.send(result);
            }
            ControlMsg::Shutdown(reason) => ctl.request_shutdown(reason),
        }
        if let Some(reason) = ctl.shutdown_requested() {
            break reason;
        }
    };
    ctl.events.emit("SHUTDOWN", json!({"guest": false, "reason": reason.qemu_name()}));
    while let Ok(msg) = rx.try_recv() {
        if let ControlMsg::Call { reply, .. } = msg {
            let _ = reply.send(Err(RpcError::failed("the daemon is shutting down")));
        }
    }
    // Dropping the receiver makes later dispatches fail at once.
    drop(rx);
    reason
}

/// The one mapping from job errors to RPC errors.
pub fn job_error(e: jobs::JobError) -> RpcError {
    use jobs::JobError as J;
    let msg = e.to_string();
    match e {
        J::Invalid(_) => RpcError::invalid_params(msg),
        J::NoSuchJob => RpcError::new(crate::error::ErrorKind::NoSuchJob, msg),
        J::NotActive(_) => RpcError::new(crate::error::ErrorKind::NotActive, msg),
        J::Exists(_) => RpcError::exists(msg),
        J::Busy(_) => RpcError::busy(msg),
        J::Failed(_) => RpcError::failed(msg),
    }
}

/// The one mapping from device-layer errors to RPC errors.
pub fn bdev_error(e: BdevError) -> RpcError {
    let msg = e.to_string();
    match e {
        BdevError::InvalidParam(_) | BdevError::Unsupported(_) => RpcError::invalid_params(msg),
        BdevError::NodeNotFound(_) => RpcError::not_found(msg),
        BdevError::DuplicateNode(_) => RpcError::exists(msg),
        BdevError::InUse { .. } | BdevError::Conflict { .. } | BdevError::Locked(_) | BdevError::Replaced { .. } => {
            RpcError::busy(msg)
        }
        BdevError::ReadOnly { .. } | BdevError::Open { .. } | BdevError::Io { .. } => RpcError::failed(msg),
        BdevError::ReactorGone => RpcError::internal(msg),
    }
}
