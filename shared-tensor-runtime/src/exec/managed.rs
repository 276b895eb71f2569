//! Managed objects: long-lived results with explicit, counted release.
//!
//! A `managed` endpoint's result is registered here with a refcount of 1 for its caller.
//! A cache hit or a singleflight joiner adds one reference for its caller; each release
//! removes one; at zero the object is destroyed along with its cache entry. References
//! are counted per **holder** (a client connection, the local process, a task that has
//! not been collected yet), so a client that disconnects gives back exactly what it held.
//!
//! Destroying an object drops the server's reference to its value. Tensors a client
//! already received stay valid until the client drops them (their leases keep the memory),
//! so a release never pulls memory from under a live tensor.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::exec::value::Value;
pub use crate::info::ObjectInfo;

/// Who holds references to managed objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Holder {
    /// Handles in this process (server-role or local-role calls).
    Local,
    /// A client connection.
    Connection(u64),
    /// A finished task whose result has not been collected.
    Task(u64),
    /// The cache of a `keep` endpoint: one reference while its entry exists.
    Kept,
}

struct Object {
    info: ObjectInfo,
    value: Arc<Value>,
    holders: HashMap<Holder, u64>,
}

impl Object {
    /// Drops the value; returns what the caller must clean up.
    fn destroy(self) -> Destroyed {
        Destroyed { endpoint: self.info.endpoint, cache_key: self.info.cache_key, object_id: self.info.object_id }
    }
}

/// An object destroyed by a release: what the caller must clean up (its cache entry).
pub(crate) struct Destroyed {
    pub endpoint: String,
    pub cache_key: Option<String>,
    pub object_id: u64,
}

pub(crate) struct Objects {
    server_id: u64,
    next_id: Mutex<u64>,
    objects: Mutex<HashMap<u64, Object>>,
}

impl Objects {
    pub(crate) fn new(server_id: u64) -> Objects {
        Objects { server_id, next_id: Mutex::new(1), objects: Mutex::new(HashMap::new()) }
    }

    /// Registers a new object with one reference for `holder`.
    pub(crate) fn create(&self, endpoint: &str, cache_key: Option<String>, value: Arc<Value>, holder: Holder) -> u64 {
        let id = {
            let mut next = self.next_id.lock();
            let id = *next;
            *next += 1;
            id
        };
        let now = SystemTime::now();
        let info = ObjectInfo {
            object_id: id,
            endpoint: endpoint.into(),
            cache_key,
            refcount: 1,
            created_at: now,
            last_accessed_at: now,
            server_id: self.server_id,
        };
        self.objects.lock().insert(id, Object { info, value, holders: HashMap::from([(holder, 1)]) });
        id
    }

    /// One more reference for `holder`, if the object still exists.
    pub(crate) fn acquire(&self, id: u64, holder: Holder) -> Option<Arc<Value>> {
        let mut objects = self.objects.lock();
        let obj = objects.get_mut(&id)?;
        obj.info.refcount += 1;
        obj.info.last_accessed_at = SystemTime::now();
        *obj.holders.entry(holder).or_insert(0) += 1;
        Some(obj.value.clone())
    }

    /// Moves one reference from one holder to another (a task's result collected).
    pub(crate) fn transfer(&self, id: u64, from: Holder, to: Holder) -> Option<Arc<Value>> {
        let mut objects = self.objects.lock();
        let obj = objects.get_mut(&id)?;
        let count = obj.holders.get_mut(&from)?;
        *count -= 1;
        if *count == 0 {
            obj.holders.remove(&from);
        }
        *obj.holders.entry(to).or_insert(0) += 1;
        obj.info.last_accessed_at = SystemTime::now();
        Some(obj.value.clone())
    }

    /// Releases one reference of `holder`. `Ok(Some(..))` if that destroyed the object,
    /// `Err(())` if the holder held no reference to it (an unknown or foreign id).
    pub(crate) fn release(&self, id: u64, holder: Holder) -> Result<Option<Destroyed>, ()> {
        let mut objects = self.objects.lock();
        let obj = objects.get_mut(&id).ok_or(())?;
        let count = obj.holders.get_mut(&holder).ok_or(())?;
        *count -= 1;
        if *count == 0 {
            obj.holders.remove(&holder);
        }
        obj.info.refcount -= 1;
        if obj.info.refcount > 0 {
            return Ok(None);
        }
        let obj = objects.remove(&id).expect("present");
        drop(objects);
        Ok(Some(obj.destroy())) // the value goes there, outside the lock
    }

    /// Removes an object whatever its references (an operator's decision): handles to it
    /// become stale; tensors they hold stay valid through their leases.
    pub(crate) fn drop_object(&self, id: u64) -> Option<Destroyed> {
        let obj = self.objects.lock().remove(&id)?;
        Some(obj.destroy())
    }

    /// Releases every reference `holder` has (a connection closed). Returns what was destroyed.
    pub(crate) fn release_holder(&self, holder: Holder) -> Vec<Destroyed> {
        let ids: Vec<(u64, u64)> =
            self.objects.lock().iter().filter_map(|(id, o)| o.holders.get(&holder).map(|n| (*id, *n))).collect();
        let mut destroyed = Vec::new();
        for (id, n) in ids {
            for _ in 0..n {
                if let Ok(Some(d)) = self.release(id, holder) {
                    destroyed.push(d);
                }
            }
        }
        destroyed
    }

    pub(crate) fn info(&self, id: u64) -> Option<ObjectInfo> {
        self.objects.lock().get(&id).map(|o| o.info.clone())
    }

    pub(crate) fn list(&self) -> Vec<ObjectInfo> {
        let mut all: Vec<ObjectInfo> = self.objects.lock().values().map(|o| o.info.clone()).collect();
        all.sort_by_key(|i| i.object_id);
        all
    }

    pub(crate) fn count(&self) -> usize {
        self.objects.lock().len()
    }

    /// References held by `holder`, in total.
    #[cfg(test)]
    pub(crate) fn held_by(&self, holder: Holder) -> u64 {
        self.objects.lock().values().filter_map(|o| o.holders.get(&holder)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value() -> Arc<Value> {
        Arc::new(Value::new(Box::new(())))
    }

    #[test]
    fn refcount_follows_acquire_and_release_and_destroys_at_zero() {
        let objects = Objects::new(9);
        let id = objects.create("load", Some("k".into()), value(), Holder::Connection(1));
        assert!(objects.acquire(id, Holder::Connection(2)).is_some());
        assert!(objects.acquire(id, Holder::Connection(1)).is_some());
        assert_eq!(objects.info(id).unwrap().refcount, 3);
        assert!(matches!(objects.release(id, Holder::Connection(1)), Ok(None)));
        assert!(matches!(objects.release(id, Holder::Connection(2)), Ok(None)));
        // Connection 2 holds nothing any more: a foreign release is refused, not counted.
        assert!(objects.release(id, Holder::Connection(2)).is_err());
        let destroyed = objects.release(id, Holder::Connection(1)).unwrap().unwrap();
        assert_eq!((destroyed.endpoint.as_str(), destroyed.cache_key.as_deref()), ("load", Some("k")));
        assert!(objects.info(id).is_none());
        assert!(objects.release(id, Holder::Connection(1)).is_err(), "unknown ids are refused");
    }

    #[test]
    fn a_closed_connection_gives_back_exactly_its_references() {
        let objects = Objects::new(9);
        let a = objects.create("a", None, value(), Holder::Connection(1));
        objects.acquire(a, Holder::Connection(1));
        objects.acquire(a, Holder::Connection(2));
        let b = objects.create("b", None, value(), Holder::Connection(1));
        let destroyed = objects.release_holder(Holder::Connection(1));
        assert_eq!(destroyed.len(), 1);
        assert_eq!(destroyed[0].object_id, b);
        assert_eq!(objects.info(a).unwrap().refcount, 1);
        assert_eq!(objects.held_by(Holder::Connection(1)), 0);
    }

    #[test]
    fn transfer_moves_a_reference_between_holders() {
        let objects = Objects::new(9);
        let id = objects.create("t", None, value(), Holder::Task(4));
        assert!(objects.transfer(id, Holder::Task(4), Holder::Connection(3)).is_some());
        assert_eq!(objects.held_by(Holder::Task(4)), 0);
        assert_eq!(objects.info(id).unwrap().refcount, 1);
        assert!(objects.transfer(id, Holder::Task(4), Holder::Local).is_none());
    }
}
