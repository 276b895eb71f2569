//! Leases: who keeps which GPU memory alive for whom.
//!
//! When a process sends tensors to its peer it **lends** their storages, one lease per
//! region of an allocator block (the storages of one block that a message carries, its
//! *parts*): it keeps owning references to the parts under the lease id until the peer
//! says it has dropped its last tensor over any of them (a `Release` message, batched) or
//! the connection closes. The receiving side maps the region once and builds one storage
//! per part over it; the region calls back into this module when the last of those
//! storages goes, and the lease id is queued for release to the lender.
//!
//! Both sides of a connection do both: the client lends its argument tensors to the
//! server, the server lends its results to the client. A storage that comes back to the
//! process that lent it (an `identity` call) is recognised by its lease and part index and
//! resolved to the lender's own storage: the same `StorageImpl`, no IPC handle opened (a
//! process cannot open its own handles anyway).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use once_cell::sync::Lazy;
use parking_lot::Mutex;
// Lease ids and cookies are counters: FxHash is enough, and cheaper than SipHash per storage.
use rustc_hash::FxHashMap as HashMap;

use crate::device::ffi;
use crate::device::ipc::StorageDescriptor;

/// Each part's (byte offset in its region, nbytes), in part order: inline for the usual
/// region of one part (a block holding one tensor's storage), so that importing a state
/// dict allocates nothing per region for it.
pub(crate) type PartPlaces = smallvec::SmallVec<[(u64, u64); 1]>;

/// One side's view of one connection: what it lent to the peer, and where releases of
/// the peer's leases go.
///
/// Ordering rule: a release must reach the peer after any message that names the same
/// lease and was queued before it. The sink therefore feeds the same ordered queue as
/// replies (server) or is written after the call that named it (client).
pub(crate) struct Link {
    next_lease: AtomicU64,
    lent: Mutex<HashMap<u64, Parts>>,
    closed: AtomicBool,
    /// Takes the peer's leases this side has released, for sending.
    sink: Box<dyn Fn(u64, UsedOn) + Send + Sync>,
}

/// The storages of one lent region, in part order: what a lease keeps alive.
pub(crate) type Parts = Arc<[ffi::OwnedStorage]>;

/// The CUDA stream a released storage was last used on: the current stream of the
/// thread that dropped it. The lender may reuse the memory once it hears of the release,
/// so that stream's queued work must be done first; the sending side settles each
/// distinct stream once per batch of releases instead of once per storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsedOn {
    device: i32,
    stream: u64,
}

impl UsedOn {
    /// Nothing to wait for (a storage that was never opened).
    pub(crate) const NOTHING: UsedOn = UsedOn { device: -1, stream: 0 };

    /// Whether its queued work is done (never waits).
    pub(crate) fn idle(self) -> bool {
        self.device < 0 || ffi::stream_settled(self.device, self.stream)
    }

    /// Waits until its queued work is done (polling: the stream is asked, never waited on
    /// inside CUDA, so that process exit never races a wait).
    pub(crate) fn settle(self) {
        while !self.idle() {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Each distinct stream of `used`, once, in the order first seen.
    fn distinct(used: impl IntoIterator<Item = UsedOn>) -> Vec<UsedOn> {
        let mut streams: Vec<UsedOn> = Vec::new();
        for u in used {
            if !streams.contains(&u) {
                streams.push(u);
            }
        }
        streams
    }

    /// Settles each distinct stream of `used` once.
    pub(crate) fn settle_all(used: impl IntoIterator<Item = UsedOn>) {
        UsedOn::distinct(used).into_iter().for_each(UsedOn::settle);
    }

    /// Takes out of `leases` those whose streams have finished their work (each stream
    /// asked once), ready to send, and leaves the others in place: the queue keeps its
    /// allocation from one batch to the next.
    pub(crate) fn take_settled(leases: &mut Vec<(u64, UsedOn)>) -> Vec<u64> {
        let idle: Vec<(UsedOn, bool)> =
            UsedOn::distinct(leases.iter().map(|&(_, u)| u)).into_iter().map(|u| (u, u.idle())).collect();
        let is_idle = |used: &UsedOn| idle.iter().any(|(u, i)| u == used && *i);
        let mut ready = Vec::with_capacity(leases.len());
        leases.retain(|(lease, used)| {
            let done = is_idle(used);
            if done {
                ready.push(*lease);
            }
            !done
        });
        ready
    }
}

impl Link {
    pub(crate) fn new(sink: Box<dyn Fn(u64, UsedOn) + Send + Sync>) -> Arc<Link> {
        Arc::new(Link {
            next_lease: AtomicU64::new(1),
            lent: Mutex::new(HashMap::default()),
            closed: AtomicBool::new(false),
            sink,
        })
    }

    /// Lends regions to the peer (under one lock); returns their leases in order. Each
    /// region's parts live until [`Link::released`] for its lease.
    pub(crate) fn lend_all(&self, holds: impl ExactSizeIterator<Item = Parts>) -> Vec<u64> {
        let first = self.next_lease.fetch_add(holds.len() as u64, Ordering::Relaxed);
        let mut lent = self.lent.lock();
        holds
            .enumerate()
            .map(|(i, hold)| {
                let lease = first + i as u64;
                lent.insert(lease, hold);
                lease
            })
            .collect()
    }

    /// The peer released these leases: drop the holds.
    pub(crate) fn released(&self, leases: &[u64]) {
        let dropped: Vec<Parts> = {
            let mut lent = self.lent.lock();
            leases.iter().filter_map(|l| lent.remove(l)).collect()
        };
        drop(dropped); // outside the lock: freeing a block may take a moment
    }

    /// New references to parts of regions this side lent (tensors coming home), each
    /// `(lease, part)` the very storage it was lent as (`None` for a lease or part no
    /// longer held), all under one lock.
    pub(crate) fn lent_storages(&self, wanted: impl Iterator<Item = (u64, u32)>) -> Vec<Option<ffi::OwnedStorage>> {
        let lent = self.lent.lock();
        wanted.map(|(lease, part)| lent.get(&lease)?.get(part as usize).map(ffi::OwnedStorage::clone_ref)).collect()
    }

    /// Number of regions currently lent to the peer.
    pub(crate) fn live_leases(&self) -> usize {
        self.lent.lock().len()
    }

    /// A storage the peer lent us that we never opened: release it at once.
    pub(crate) fn release_unopened(&self, lease: u64) {
        self.queue_release(lease, UsedOn::NOTHING);
    }

    /// Hands a release of the peer's lease to the sink, unless the connection is gone.
    fn queue_release(&self, lease: u64, used: UsedOn) {
        if !self.closed.load(Ordering::Acquire) {
            (self.sink)(lease, used);
        }
    }

    /// Whether the connection closed (its clean-up has begun).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The connection closed: everything lent is released (the peer's mappings die with
    /// it, or are its own problem if it lives on), nothing more is queued.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let lent = std::mem::take(&mut *self.lent.lock());
        drop(lent);
    }
}

/// What a region imported from a peer remembers: whom to tell when its last storage is
/// dropped, and how it was described (to forward a part of it to a third process).
struct ImportRecord {
    link: Weak<Link>,
    lease: u64,
    descriptor: StorageDescriptor,
    /// Each part's (byte offset in the region, nbytes), in part order.
    parts: PartPlaces,
}

/// A region just imported, to register: its cookie, the peer's lease, its descriptor and
/// its parts' (offset, nbytes).
pub(crate) struct NewImport {
    pub cookie: u64,
    pub lease: u64,
    pub descriptor: StorageDescriptor,
    pub parts: PartPlaces,
}

static IMPORTS: Lazy<Mutex<HashMap<u64, ImportRecord>>> = Lazy::new(|| {
    ffi::set_release_fn(on_storage_released);
    Mutex::new(HashMap::default())
});
static NEXT_COOKIE: AtomicU64 = AtomicU64::new(1);

/// The first of `n` consecutive cookies to build imported regions with (the release
/// hook is installed by now).
pub(crate) fn new_cookies(n: usize) -> u64 {
    Lazy::force(&IMPORTS);
    NEXT_COOKIE.fetch_add(n as u64, Ordering::Relaxed)
}

/// Registers regions just imported from `link`'s peer, under one lock. The caller still
/// holds their storages, so their releases cannot come before this.
pub(crate) fn register_imports(link: &Arc<Link>, records: Vec<NewImport>) {
    let weak = Arc::downgrade(link);
    let mut imports = IMPORTS.lock();
    imports.reserve(records.len());
    for NewImport { cookie, lease, descriptor, parts } in records {
        imports.insert(cookie, ImportRecord { link: weak.clone(), lease, descriptor, parts });
    }
}

/// Registers an import of one region with `parts` and returns its new cookie (tests).
#[cfg(test)]
fn register_new(link: &Arc<Link>, lease: u64, descriptor: StorageDescriptor, parts: Vec<(u64, u64)>) -> u64 {
    let cookie = new_cookies(1);
    register_imports(link, vec![NewImport { cookie, lease, descriptor, parts: parts.into() }]);
    cookie
}

/// Where an imported storage came from, seen from one link.
pub(crate) enum Origin {
    /// Lent to us by this link's peer under this lease.
    ThisPeer(u64),
    /// Imported through another connection (its descriptor can be forwarded).
    Elsewhere,
    /// Not a storage we imported (or one whose record is gone).
    Unknown,
}

/// Where the imported region `cookie` came from, seen from `link` (tests; the sender
/// asks [`origins`] once per message).
#[cfg(test)]
pub(crate) fn origin(cookie: u64, link: &Arc<Link>) -> Origin {
    origins(std::iter::once(cookie), link).pop().expect("one origin per cookie")
}

/// [`origin`] of each cookie, under one lock (a value returning many imported tensors).
pub(crate) fn origins(cookies: impl Iterator<Item = u64>, link: &Arc<Link>) -> Vec<Origin> {
    let imports = IMPORTS.lock();
    cookies
        .map(|cookie| match imports.get(&cookie) {
            Some(rec) if rec.link.as_ptr() == Arc::as_ptr(link) => Origin::ThisPeer(rec.lease),
            Some(_) => Origin::Elsewhere,
            None => Origin::Unknown,
        })
        .collect()
}

/// An imported region as a sender sees it when its storages go out again: the region's
/// descriptor and its parts' (offset in the region, nbytes), in part order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ImportedRegion {
    pub descriptor: StorageDescriptor,
    pub parts: PartPlaces,
}

/// The imported region `cookie` (to send its parts back to its lender, or forward them to
/// another peer); one lookup and one copy of its descriptor however many of its parts a
/// value holds.
pub(crate) fn imported_region(cookie: u64) -> Option<ImportedRegion> {
    let imports = IMPORTS.lock();
    let rec = imports.get(&cookie)?;
    Some(ImportedRegion { descriptor: rec.descriptor.clone(), parts: rec.parts.clone() })
}

/// Number of regions this process currently holds from peers.
pub(crate) fn live_imports() -> usize {
    IMPORTS.lock().len()
}

fn release_cookie(cookie: u64, used: UsedOn) {
    let rec = IMPORTS.lock().remove(&cookie);
    if let Some(rec) = rec {
        if let Some(link) = rec.link.upgrade() {
            link.queue_release(rec.lease, used);
        }
    }
}

/// Called by the C++ side when the last reference to an imported storage goes. Must not
/// unwind into C++.
extern "C" fn on_storage_released(cookie: u64, device: i32, stream: u64) {
    let _ = std::panic::catch_unwind(|| release_cookie(cookie, UsedOn { device, stream }));
}

/// Makes sure the release hook is installed before the first import.
pub(crate) fn init() {
    Lazy::force(&IMPORTS);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A link whose sink records what it is given.
    fn recording_link() -> (Arc<Link>, Arc<Mutex<Vec<u64>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Link::new(Box::new(move |lease, _| s.lock().push(lease))), seen)
    }

    fn descriptor() -> StorageDescriptor {
        StorageDescriptor {
            handle: vec![1],
            offset: 0,
            nbytes: 4,
            device: crate::device::ipc::GpuId { index: 0, uuid: [0; 16] },
            producer: crate::device::ipc::ProcessId { pid: 1, instance: 2 },
        }
    }

    #[test]
    fn dropped_imports_release_their_lease_to_their_link() {
        let (link, seen) = recording_link();
        let a = register_new(&link, 10, descriptor(), vec![(0, 4)]);
        let b = register_new(&link, 11, descriptor(), vec![(0, 4)]);
        assert!(matches!(origin(a, &link), Origin::ThisPeer(10)));
        release_cookie(a, UsedOn::NOTHING);
        release_cookie(b, UsedOn::NOTHING);
        release_cookie(b, UsedOn::NOTHING); // a second release of one cookie does nothing
        assert_eq!(*seen.lock(), vec![10, 11]);
        assert!(matches!(origin(a, &link), Origin::Unknown));
    }

    #[test]
    fn lent_storages_live_until_released_or_closed() {
        let (link, _) = recording_link();
        assert_eq!(link.live_leases(), 0);
        assert!(link.lent_storages([(1, 0)].into_iter()).pop().unwrap().is_none());
        link.released(&[1, 2]); // unknown leases are ignored
        assert_eq!(link.live_leases(), 0);
    }

    #[test]
    fn other_links_see_imports_as_forwardable() {
        let (link, seen) = recording_link();
        let (other, _) = recording_link();
        let mut region = descriptor();
        (region.offset, region.nbytes) = (512, 4096);
        let c = register_new(&link, 5, region.clone(), vec![(0, 4), (1024, 64)]);
        assert!(matches!(origin(c, &other), Origin::Elsewhere));
        // Its parts can be forwarded: the region's descriptor and the parts' places in it.
        let found = imported_region(c).expect("registered");
        assert_eq!(found, ImportedRegion { descriptor: region, parts: smallvec::smallvec![(0, 4), (1024, 64)] });
        assert_eq!(imported_region(c + 1_000_000), None, "an unknown cookie");
        release_cookie(c, UsedOn::NOTHING);
        assert_eq!(*seen.lock(), vec![5]);
    }

    #[test]
    fn a_closed_link_queues_nothing() {
        let (link, seen) = recording_link();
        let c = register_new(&link, 1, descriptor(), vec![(0, 4)]);
        link.close();
        release_cookie(c, UsedOn::NOTHING);
        assert!(seen.lock().is_empty());
    }
}
