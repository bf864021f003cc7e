//! Asynchronous events (QEMU's JOB_STATUS_CHANGE, SHUTDOWN, ...) fanned out
//! to every connected client.
//!
//! Each subscriber has a bounded queue. A client that does not read its
//! events fills its queue; it is then marked overflowed and its connection
//! is closed — it never blocks the emitter or grows the daemon's memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use serde_json::{Value, json};

/// Events a subscriber may have queued before it is dropped.
pub const EVENT_QUEUE_MAX: usize = 1024;

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub name: String,
    pub data: Value,
    pub timestamp: SystemTime,
}

impl Event {
    /// QEMU's timestamp object: `{"seconds": .., "microseconds": ..}`.
    pub fn timestamp_json(&self) -> Value {
        let d = self.timestamp.duration_since(UNIX_EPOCH).unwrap_or_default();
        json!({"seconds": d.as_secs(), "microseconds": d.subsec_micros()})
    }
}

/// Called once when a subscriber falls behind (the server closes its connection).
pub type OverflowHook = Box<dyn Fn() + Send + Sync>;

struct Subscriber {
    tx: Sender<Arc<Event>>,
    overflowed: Arc<AtomicBool>,
    /// Set when the [`Subscription`] is dropped (its client left).
    gone: Arc<AtomicBool>,
    /// Owns what the subscriber's owner handed over (a connection's socket):
    /// dropped with the entry, so a departed client holds nothing here.
    on_overflow: Option<OverflowHook>,
}

/// Fans events out to subscribers.
#[derive(Default)]
pub struct EventBus {
    subscribers: Mutex<Vec<Subscriber>>,
}

/// A subscriber's end: events in emission order.
pub struct Subscription {
    pub rx: Receiver<Arc<Event>>,
    overflowed: Arc<AtomicBool>,
    gone: Arc<AtomicBool>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.gone.store(true, Ordering::Release);
    }
}

impl Subscription {
    /// True once events were lost because the queue was full.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }
}

impl EventBus {
    pub fn new() -> EventBus {
        EventBus::default()
    }

    pub fn subscribe(&self) -> Subscription {
        self.subscribe_inner(None)
    }

    /// Like `subscribe`; `on_overflow` runs once if the subscriber falls
    /// behind, so its owner can act at once (close the connection).
    pub fn subscribe_with_hook(&self, on_overflow: OverflowHook) -> Subscription {
        self.subscribe_inner(Some(on_overflow))
    }

    fn subscribe_inner(&self, on_overflow: Option<OverflowHook>) -> Subscription {
        let (tx, rx) = bounded(EVENT_QUEUE_MAX);
        let overflowed = Arc::new(AtomicBool::new(false));
        let gone = Arc::new(AtomicBool::new(false));
        let mut subs = self.lock();
        // Entries of departed subscribers go now, not at the next event: a
        // daemon that emits none would otherwise keep every connection's
        // socket and queue it ever had.
        subs.retain(|s| !s.gone.load(Ordering::Acquire));
        subs.push(Subscriber { tx, overflowed: Arc::clone(&overflowed), gone: Arc::clone(&gone), on_overflow });
        Subscription { rx, overflowed, gone }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        self.subscribers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Delivers an event to every live subscriber without blocking.
    pub fn emit(&self, name: &str, data: Value) {
        let event = Arc::new(Event { name: name.to_string(), data, timestamp: SystemTime::now() });
        tracing::debug!(event = name, "event");
        self.lock().retain(|s| {
            !s.gone.load(Ordering::Acquire)
                && match s.tx.try_send(Arc::clone(&event)) {
                    Ok(()) => true,
                    Err(TrySendError::Full(_)) => {
                        if !s.overflowed.swap(true, Ordering::AcqRel) {
                            tracing::warn!(event = name, "a client is not reading its events; dropping it");
                            if let Some(hook) = &s.on_overflow {
                                hook();
                            }
                        }
                        false
                    }
                    Err(TrySendError::Disconnected(_)) => false,
                }
        });
    }

    /// Live subscribers.
    pub fn subscribers(&self) -> usize {
        self.lock().iter().filter(|s| !s.gone.load(Ordering::Acquire)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departed_subscribers_are_forgotten_without_an_event() {
        let bus = EventBus::new();
        let owned = Arc::new(());
        let held = Arc::clone(&owned);
        let a = bus.subscribe_with_hook(Box::new(move || drop(Arc::clone(&held))));
        assert_eq!(Arc::strong_count(&owned), 2);
        drop(a);
        assert_eq!(bus.subscribers(), 0);
        // The next subscriber prunes the entry and what its hook owned.
        let _b = bus.subscribe();
        assert_eq!(Arc::strong_count(&owned), 1);
        assert_eq!(bus.lock().len(), 1);
    }

    #[test]
    fn fan_out_in_order() {
        let bus = EventBus::new();
        let a = bus.subscribe();
        let b = bus.subscribe();
        bus.emit("ONE", json!({"n": 1}));
        bus.emit("TWO", json!({}));
        for s in [&a, &b] {
            assert_eq!(s.rx.try_recv().unwrap().name, "ONE");
            assert_eq!(s.rx.try_recv().unwrap().name, "TWO");
        }
        let ts = a.rx.try_recv().map(|e| e.timestamp_json());
        assert!(ts.is_err());
    }

    #[test]
    fn slow_subscribers_are_dropped_not_waited_for() {
        let bus = EventBus::new();
        let slow = bus.subscribe();
        let fast = bus.subscribe();
        for i in 0..EVENT_QUEUE_MAX + 10 {
            bus.emit("E", json!({"i": i}));
            while fast.rx.try_recv().is_ok() {}
        }
        assert!(slow.overflowed());
        assert!(!fast.overflowed());
        let hooked = Arc::new(AtomicBool::new(false));
        let h = Arc::clone(&hooked);
        let _sub = bus.subscribe_with_hook(Box::new(move || h.store(true, Ordering::SeqCst)));
        for _ in 0..=EVENT_QUEUE_MAX {
            bus.emit("E", json!({}));
            while fast.rx.try_recv().is_ok() {}
        }
        assert!(hooked.load(Ordering::SeqCst), "the hook runs when the subscriber overflows");
        assert_eq!(bus.subscribers(), 1);
        drop(fast);
        bus.emit("E", json!({}));
        assert_eq!(bus.subscribers(), 0);
    }

    #[test]
    fn timestamp_shape() {
        let e = Event {
            name: "X".into(),
            data: json!({}),
            timestamp: UNIX_EPOCH + std::time::Duration::from_micros(1_500_002),
        };
        assert_eq!(e.timestamp_json(), json!({"seconds": 1, "microseconds": 500002}));
    }
}
