//! User-created objects (QEMU's `object-add`): `iothread` now — a name
//! for one of the reactors, which nodes and exports can be placed on —
//! and the home of `secret` and `throttle-group` objects to come.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// One object.
#[derive(Debug, Clone)]
pub enum Object {
    IoThread(IoThread),
}

impl Object {
    pub fn qom_type(&self) -> &'static str {
        match self {
            Object::IoThread(_) => "iothread",
        }
    }
}

/// An iothread: the reactor it names (index into the daemon's reactors)
/// and the properties it was created with (QEMU's polling and batching
/// knobs: accepted and shown, the reactor's own adaptive polling applies).
#[derive(Debug, Clone)]
pub struct IoThread {
    pub reactor: usize,
    pub props: Map<String, Value>,
}

/// Objects by id, in creation order for `save_config`.
#[derive(Debug, Default)]
pub struct Objects {
    by_id: BTreeMap<String, (u64, Object)>,
    next: u64,
}

impl Objects {
    pub fn get(&self, id: &str) -> Option<&Object> {
        self.by_id.get(id).map(|(_, o)| o)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn insert(&mut self, id: String, object: Object) {
        self.next += 1;
        self.by_id.insert(id, (self.next, object));
    }

    pub fn remove(&mut self, id: &str) -> Option<Object> {
        self.by_id.remove(id).map(|(_, o)| o)
    }

    /// (id, object) in creation order.
    pub fn iter(&self) -> Vec<(&str, &Object)> {
        let mut v: Vec<_> = self.by_id.iter().map(|(id, (seq, o))| (*seq, id.as_str(), o)).collect();
        v.sort_by_key(|e| e.0);
        v.into_iter().map(|(_, id, o)| (id, o)).collect()
    }

    /// The reactor index an iothread names.
    pub fn iothread(&self, id: &str) -> Option<usize> {
        self.get(id).map(|o| match o {
            Object::IoThread(t) => t.reactor,
        })
    }

    /// Iothreads per reactor index (for choosing where a new one goes).
    pub fn iothreads_on(&self, reactor: usize) -> usize {
        self.by_id.values().filter(|(_, o)| matches!(o, Object::IoThread(t) if t.reactor == reactor)).count()
    }

    /// The `object-add` calls that recreate every object.
    pub fn save_config(&self) -> Vec<Value> {
        self.iter()
            .into_iter()
            .map(|(id, o)| {
                let mut params = json!({"qom-type": o.qom_type(), "id": id});
                match o {
                    Object::IoThread(t) => {
                        for (k, v) in &t.props {
                            params[k] = v.clone();
                        }
                        params["x-reactor"] = json!(t.reactor);
                    }
                }
                json!({"method": "object-add", "params": params})
            })
            .collect()
    }
}
