//! Starting and stopping a set of pinned reactor threads.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::cpuset::pin_current_thread;
use crate::reactor::{Handle, Reactor, ReactorOptions};

/// Why reactors could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("no cores given")]
    NoCores,
    #[error("pinning reactor thread to core {core} failed: {source}")]
    Pin { core: usize, source: nix::Error },
    #[error("creating reactor on core {core} failed: {source}")]
    Create { core: usize, source: std::io::Error },
    #[error("spawning reactor thread failed: {0}")]
    Spawn(std::io::Error),
}

/// A running set of reactors, one per core, each on its own pinned thread.
pub struct Reactors {
    handles: Vec<Handle>,
    threads: Vec<JoinHandle<()>>,
}

impl Reactors {
    /// Starts one reactor per core in `cores` (pinned when `pin`), and
    /// returns once every one of them is running.
    pub fn start(cores: &[usize], pin: bool, options: ReactorOptions) -> Result<Reactors, StartError> {
        if cores.is_empty() {
            return Err(StartError::NoCores);
        }
        let mut reactors = Reactors { handles: Vec::new(), threads: Vec::new() };
        // Kernel workers for punted requests may use every allowed core.
        let workers = crate::cpuset::allowed_cores().unwrap_or_default();
        for &core in cores {
            let workers = workers.clone();
            let (tx, rx) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("reactor_{core}"))
                .spawn(move || {
                    if pin && let Err(source) = pin_current_thread(core) {
                        let _ = tx.send(Err(StartError::Pin { core, source }));
                        return;
                    }
                    let reactor = match Reactor::new(Some(core), options) {
                        Ok(r) => r,
                        Err(source) => {
                            let _ = tx.send(Err(StartError::Create { core, source }));
                            return;
                        }
                    };
                    if pin
                        && !workers.is_empty()
                        && let Err(e) = reactor.ring().set_worker_cores(&workers)
                    {
                        tracing::debug!(core, error = %e, "io-wq worker affinity not set");
                    }
                    if let Err(e) = reactor.ring().set_max_workers(workers.len().max(1) as u32) {
                        tracing::debug!(core, error = %e, "io-wq worker limit not set");
                    }
                    let _ = tx.send(Ok(reactor.handle()));
                    tracing::debug!(core, id = reactor.id(), "reactor running");
                    reactor.run();
                    tracing::debug!(core, "reactor stopped");
                })
                .map_err(StartError::Spawn)?;
            reactors.threads.push(thread);
            match rx.recv() {
                Ok(Ok(handle)) => reactors.handles.push(handle),
                Ok(Err(e)) => {
                    reactors.stop();
                    return Err(e);
                }
                Err(_) => {
                    reactors.stop();
                    return Err(StartError::Spawn(std::io::Error::other("reactor thread died during start")));
                }
            }
        }
        Ok(reactors)
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The first reactor: home of control-plane work by default.
    pub fn main(&self) -> &Handle {
        &self.handles[0]
    }

    /// Stops every reactor and joins its thread.
    pub fn stop(&mut self) {
        for h in &self.handles {
            h.stop();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
        self.handles.clear();
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop();
    }
}
