//! Payloads: the values that cross an endpoint, and how.
//!
//! A **payload** ([`Payload`]) is a value that carries GPU memory: a CUDA tensor, a tch
//! nn module, an `nn::VarStore`, a struct deriving `Payload`, or `()`, `Option`, `Vec`,
//! tuples and `String`-keyed maps of those. An endpoint's result must be a payload; the
//! compiler says so otherwise. Its tensors travel as CUDA IPC descriptors, never by value.
//!
//! An **argument** ([`Argument`]) is a payload or a plain value (anything serde can
//! serialize: numbers, strings, configuration structs), which travels as MessagePack.
//!
//! On the wire a value is a tree of [`Node`]s. Tensors are indices into the message's
//! tensor table, and each tensor points into its storage table: tensors over one storage
//! (views, tied weights) share one storage entry, so they stay aliased on the other side
//! and the storage's memory is opened once.
//!
//! ```
//! use shared_tensor_runtime::payload::{Node, Payload};
//! // `()` is a payload: a result that carries nothing.
//! fn takes_payload<P: Payload>() {}
//! takes_payload::<()>();
//! takes_payload::<Vec<Option<tch::Tensor>>>();
//! ```

mod containers;
mod debug_text;
pub mod flat;
pub mod nn;
mod packed;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{Error, Result};
use crate::ffi;
use crate::ipc::{self, EventHandle, GpuId, StorageDescriptor, TensorView};
use crate::lease::{self, Link, Origin};

/// One value on the wire.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::payload::{Encoder, Node, Payload};
/// let mut enc = Encoder::new("result");
/// assert_eq!(().encode(&mut enc)?, Node::Unit);
/// assert_eq!(None::<tch::Tensor>.encode(&mut enc)?, Node::Opt(None));
/// assert_eq!(vec![(), ()].encode(&mut enc)?, Node::Seq(vec![Node::Unit, Node::Unit]));
/// assert!(matches!(enc.data(&0.5f64)?, Node::Data(_)));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Node {
    /// `()`.
    Unit,
    /// A tensor: an index into the message's tensor table.
    Tensor(u32),
    /// `Option`.
    Opt(Option<Box<Node>>),
    /// A sequence: `Vec`, tuple, tuple struct.
    Seq(Vec<Node>),
    /// Named parts: struct fields, `String`-keyed maps.
    Map(Vec<(String, Node)>),
    /// An enum variant and its content.
    Variant(String, Box<Node>),
    /// A plain value, as MessagePack.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
}

impl Node {
    fn kind(&self) -> &'static str {
        match self {
            Node::Unit => "()",
            Node::Tensor(_) => "a tensor",
            Node::Opt(_) => "an Option",
            Node::Seq(_) => "a sequence",
            Node::Map(_) => "a map",
            Node::Variant(..) => "an enum variant",
            Node::Data(_) => "a plain value",
        }
    }
}

/// A storage in a message.
///
/// ```
/// use shared_tensor_runtime::payload::{Node, WirePayload, WireStorage};
/// // The bytes of GPU memory a message makes the receiver open.
/// fn shared_bytes(msg: &WirePayload) -> u64 {
///     let bytes = |s: &WireStorage| match s {
///         WireStorage::Shared { storage, .. } => storage.nbytes,
///         WireStorage::Returned { .. } => 0,
///     };
///     msg.storages.iter().map(bytes).sum()
/// }
/// assert_eq!(shared_bytes(&WirePayload::plain(Node::Unit)), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WireStorage {
    /// Memory the receiver opens by IPC; it releases `lease` to the sender when done.
    Shared {
        /// Where the memory is.
        storage: StorageDescriptor,
        /// The sender's lease.
        lease: u64,
    },
    /// Memory the receiver lent to the sender under `lease`: the receiver's own storage.
    Returned {
        /// The receiver's lease.
        lease: u64,
    },
}

/// A tensor in a message: a view of one of the message's storages.
///
/// ```
/// use shared_tensor_runtime::ipc::{DType, TensorView};
/// use shared_tensor_runtime::payload::WireTensor;
/// let (sizes, strides) = (vec![4], vec![1]);
/// let view = TensorView { dtype: DType::F32, sizes, strides, storage_offset: 0, requires_grad: false };
/// let whole = WireTensor { storage: 0, view };
/// // Its last two elements: another tensor over the same storage entry.
/// let tail = WireTensor { storage: 0, view: TensorView { sizes: vec![2], storage_offset: 2, ..whole.view.clone() } };
/// assert_eq!(whole.storage, tail.storage);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Index into the storage table.
    pub storage: u32,
    /// How it looks at the storage.
    pub view: TensorView,
}

/// A whole value as sent: storages, tensors, ready events, and the value tree.
///
/// It travels packed ([`PackedPayload`]).
///
/// ```
/// use shared_tensor_runtime::payload::{Node, WirePayload};
/// fn describe(msg: &WirePayload) -> String {
///     let (t, s, e) = (msg.tensors.len(), msg.storages.len(), msg.ready.len());
///     format!("{t} tensors over {s} storages, {e} ready events")
/// }
/// assert_eq!(describe(&WirePayload::plain(Node::Unit)), "0 tensors over 0 storages, 0 ready events");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct WirePayload {
    /// The storages.
    pub storages: Vec<WireStorage>,
    /// The tensors.
    pub tensors: Vec<WireTensor>,
    /// One event per GPU, recorded after the work that produced the data.
    pub ready: Vec<(GpuId, EventHandle)>,
    /// The value.
    pub root: Node,
}

/// A [`WirePayload`] as it travels: one MessagePack binary in a compact fixed layout
/// (tag bytes and fixed-width fields, see `docs/architecture.md`), which is what call
/// arguments and results carry. A sender packs straight from its own tables (a cached
/// result is lent without copying them); [`PackedPayload::unpack`] checks every length,
/// tag and dtype, so a corrupt payload is an error naming what is wrong and where.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
/// let value = WirePayload::plain(Node::Seq(vec![Node::Unit, Node::Opt(None)]));
/// let packed = PackedPayload::pack(&value)?;
/// assert_eq!(packed.unpack()?, value);
/// assert!(PackedPayload::from_bytes(vec![9, 9]).unpack().is_err());
/// # Ok(()) }
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct PackedPayload(Vec<u8>);

impl PackedPayload {
    /// Packs a payload. Fails only for a value nested deeper than 256 levels.
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// assert_eq!(packed.as_bytes().len(), 13); // three empty tables and a unit
    /// ```
    pub fn pack(payload: &WirePayload) -> Result<PackedPayload> {
        PackedPayload::packed_by(|out| packed::pack(payload, out))
    }

    /// The bytes `write` packs; its error (a value nested too deep) as a typed one.
    fn packed_by(write: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), String>) -> Result<PackedPayload> {
        let mut bytes = Vec::new();
        write(&mut bytes).map_err(|e| Error::Protocol(format!("cannot pack a payload: {e}")))?;
        Ok(PackedPayload(bytes))
    }

    /// Reads the payload back, checking it.
    ///
    /// ```
    /// use shared_tensor_runtime::payload::PackedPayload;
    /// let err = PackedPayload::from_bytes(vec![1, 0, 0, 0]).unpack().unwrap_err();
    /// assert!(err.to_string().contains("malformed payload"), "{err}");
    /// ```
    /// Every storage descriptor and tensor view is checked too ([`WirePayload::check`]):
    /// a descriptor pointing outside its storage is an error here, before anything is mapped.
    pub fn unpack(&self) -> Result<WirePayload> {
        let payload = packed::unpack(&self.0).map_err(|e| Error::Protocol(format!("malformed payload: {e}")))?;
        payload.check().map_err(|e| Error::Protocol(format!("malformed payload: {e}")))?;
        Ok(payload)
    }

    /// The packed bytes.
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// assert_eq!(packed.as_bytes().last(), Some(&0)); // the unit node's tag
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Wraps bytes received some other way (unchecked until [`PackedPayload::unpack`]).
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// let copy = PackedPayload::from_bytes(packed.as_bytes().to_vec());
    /// assert_eq!(copy, packed);
    /// ```
    pub fn from_bytes(bytes: Vec<u8>) -> PackedPayload {
        PackedPayload(bytes)
    }
}

impl fmt::Debug for PackedPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackedPayload({} bytes)", self.0.len())
    }
}

impl Serialize for PackedPayload {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for PackedPayload {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        struct Bytes;
        impl<'de> serde::de::Visitor<'de> for Bytes {
            type Value = PackedPayload;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a packed payload (binary)")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> std::result::Result<PackedPayload, E> {
                Ok(PackedPayload(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> std::result::Result<PackedPayload, E> {
                Ok(PackedPayload(bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<PackedPayload, A::Error> {
                // Formats without a binary type (JSON) carry the bytes as a sequence.
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                Ok(PackedPayload(bytes))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

impl WirePayload {
    /// A payload with no GPU memory.
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node, WirePayload};
    /// // Call arguments `(8, "fp16")`: plain values only, nothing to lend.
    /// let mut enc = Encoder::new("args");
    /// let args = WirePayload::plain(Node::Seq(vec![enc.data(&8i64)?, enc.data("fp16")?]));
    /// assert!(args.storages.is_empty() && args.ready.is_empty());
    /// # Ok(()) }
    /// ```
    pub fn plain(root: Node) -> WirePayload {
        WirePayload { storages: Vec::new(), tensors: Vec::new(), ready: Vec::new(), root }
    }

    /// Checks every descriptor before anything is mapped: each shared storage
    /// ([`StorageDescriptor::check`]), and each tensor's storage index and view
    /// ([`TensorView::check`], against its storage's size when the storage is shared; a
    /// returned storage is this process's own, whose size is checked when the view is
    /// built). The error names the storage or tensor by its index and the field.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::{DType, TensorView};
    /// use shared_tensor_runtime::payload::{Node, WirePayload, WireStorage, WireTensor};
    /// let mut msg = WirePayload::plain(Node::Tensor(0));
    /// msg.storages.push(WireStorage::Returned { lease: 1 });
    /// let view = TensorView { dtype: DType::F32, sizes: vec![4], strides: vec![-1], storage_offset: 3, requires_grad: false };
    /// msg.tensors.push(WireTensor { storage: 0, view });
    /// let err = msg.check().unwrap_err();
    /// assert!(err.starts_with("tensor 0: stride -1 of dimension 0 is negative"), "{err}");
    /// ```
    pub fn check(&self) -> std::result::Result<(), String> {
        for (i, s) in self.storages.iter().enumerate() {
            if let WireStorage::Shared { storage, .. } = s {
                storage.check().map_err(|e| format!("storage {i}: {e}"))?;
            }
        }
        for (i, t) in self.tensors.iter().enumerate() {
            let nbytes = match self.storages.get(t.storage as usize) {
                Some(WireStorage::Shared { storage, .. }) => Some(storage.nbytes),
                Some(WireStorage::Returned { .. }) => None,
                None => {
                    return Err(format!(
                        "tensor {i}: storage {} is not in the message ({} storages)",
                        t.storage,
                        self.storages.len()
                    ))
                }
            };
            t.view.check(nbytes).map_err(|e| format!("tensor {i}: {e}"))?;
        }
        Ok(())
    }
}

/// Where a value part is: `encoder.layers[3].weight`.
#[derive(Clone, Default)]
pub(crate) struct Path(Vec<Seg>);

#[derive(Clone)]
enum Seg {
    Field(String),
    Index(usize),
    Key(String),
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("the value");
        }
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Field(name) if i == 0 => write!(f, "{name}")?,
                Seg::Field(name) => write!(f, ".{name}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key(k) => write!(f, "[{k:?}]")?,
            }
        }
        Ok(())
    }
}

/// Something that walks a value and tracks where it is.
trait Walker {
    fn path_mut(&mut self) -> &mut Path;

    fn scoped<T>(&mut self, seg: Seg, f: impl FnOnce(&mut Self) -> T) -> T
    where
        Self: Sized,
    {
        self.path_mut().0.push(seg);
        let out = f(self);
        self.path_mut().0.pop();
        out
    }
}

impl Walker for Path {
    fn path_mut(&mut self) -> &mut Path {
        self
    }
}

impl Walker for Encoder {
    fn path_mut(&mut self) -> &mut Path {
        &mut self.path
    }
}

impl Walker for Decoder {
    fn path_mut(&mut self) -> &mut Path {
        &mut self.path
    }
}

impl Path {
    fn rooted(root: &str) -> Path {
        let mut path = Path::default();
        if !root.is_empty() {
            path.0.push(Seg::Field(root.to_string()));
        }
        path
    }
}

/// Where an encoded storage's memory comes from.
enum Source {
    /// This process's memory.
    Own(StorageDescriptor),
    /// Memory this process imported (cookie), with the descriptor to forward it.
    Imported(u64, StorageDescriptor),
}

struct EncodedStorage {
    source: Source,
    hold: ffi::OwnedStorage,
    /// Address of the storage's first byte in this process.
    base: u64,
    /// Bytes of the tensors' storages it stands for (a block region counts its parts, not
    /// the gaps between them).
    bytes: u64,
}

impl EncodedStorage {
    fn descriptor(&self) -> &StorageDescriptor {
        match &self.source {
            Source::Own(d) | Source::Imported(_, d) => d,
        }
    }
}

/// A ready event of a message: the GPU and the event recorded on it.
type ReadyEvent = (GpuId, EventHandle);

/// How one storage of a value goes to a peer.
enum Lent {
    /// Lent under this new lease.
    Shared(u64),
    /// The peer's own storage, under the peer's lease.
    Returned(u64),
}

/// A value encoded for sending, independent of the receiver: IPC handles exported once,
/// storages held. Lending it turns it into a message for one peer, as often as
/// needed (a cached result is encoded once and lent to every caller).
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::payload::Encoder;
/// let device = shared_tensor_runtime::cuda::device()?;
/// let weights = vec![tch::Tensor::randn([256, 256], (tch::Kind::Float, device))];
/// let encoded = Encoder::encode("result", &weights)?;
/// println!("{} tensor(s), {} bytes", encoded.tensor_count(), encoded.storage_bytes());
/// # Ok(()) }
/// ```
pub struct Encoded {
    storages: Vec<EncodedStorage>,
    tensors: Vec<WireTensor>,
    devices: Vec<GpuId>,
    root: Node,
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("storages", &self.storages.len())
            .field("tensors", &self.tensors.len())
            .field("root", &self.root)
            .finish()
    }
}

impl Encoded {
    /// Lends the value to `link`'s peer: records a ready event per GPU on the calling
    /// thread's current stream, and decides per storage whether it goes back as the
    /// peer's own or is lent under a new lease (under one lock).
    fn lend_parts(&self, link: &Arc<Link>) -> Result<(Vec<ReadyEvent>, Vec<Lent>)> {
        let mut ready = Vec::new();
        for gpu in &self.devices {
            if let Some(event) = EventHandle::when_ready(gpu.index)? {
                ready.push((*gpu, event));
            }
        }
        let returned: Vec<Option<u64>> = self
            .storages
            .iter()
            .map(|s| match &s.source {
                Source::Imported(cookie, _) => match lease::origin(*cookie, link) {
                    Origin::ThisPeer(lease) => Some(lease),
                    Origin::Elsewhere | Origin::Unknown => None,
                },
                Source::Own(_) => None,
            })
            .collect();
        let lent: Vec<ffi::OwnedStorage> =
            self.storages.iter().zip(&returned).filter(|(_, r)| r.is_none()).map(|(s, _)| s.hold.clone_ref()).collect();
        let mut leases = link.lend_all(lent.into_iter()).into_iter();
        let lent = returned
            .into_iter()
            .map(|r| match r {
                Some(lease) => Lent::Returned(lease),
                None => Lent::Shared(leases.next().expect("one lease per lent storage")),
            })
            .collect();
        Ok((ready, lent))
    }

    /// The storages as lent, borrowed.
    fn storage_refs<'a>(&'a self, lent: &'a [Lent]) -> impl ExactSizeIterator<Item = packed::StorageRef<'a>> + 'a {
        self.storages.iter().zip(lent).map(|(s, lent)| match lent {
            Lent::Returned(lease) => packed::StorageRef::Returned(*lease),
            Lent::Shared(lease) => packed::StorageRef::Shared(s.descriptor(), *lease),
        })
    }

    /// A message for `link`'s peer, packed straight from this value's tables; also the
    /// bytes of GPU memory it lends.
    pub(crate) fn lend(&self, link: &Arc<Link>) -> Result<(PackedPayload, u64)> {
        let (ready, lent) = self.lend_parts(link)?;
        // The tensors' bytes, not a block region's gaps.
        let shared =
            self.storages.iter().zip(&lent).map(|(s, l)| if let Lent::Shared(_) = l { s.bytes } else { 0 }).sum();
        let payload = PackedPayload::packed_by(|out| {
            packed::pack_parts(self.storage_refs(&lent), &self.tensors, &ready, &self.root, out)
        })?;
        Ok((payload, shared))
    }

    /// Number of distinct storages in the value.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// # use shared_tensor_runtime::payload::Encoder;
    /// let x = tch::Tensor::randn([8, 8], (tch::Kind::Float, shared_tensor_runtime::cuda::device()?));
    /// // A tensor and its transpose share one storage.
    /// let encoded = Encoder::encode("result", &(x.shallow_clone(), x.transpose(0, 1)))?;
    /// assert_eq!(encoded.storage_count(), 1);
    /// # Ok(()) }
    /// ```
    pub fn storage_count(&self) -> usize {
        self.storages.len()
    }

    /// Number of tensors in the value.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// # use shared_tensor_runtime::payload::Encoder;
    /// let x = tch::Tensor::randn([8, 8], (tch::Kind::Float, shared_tensor_runtime::cuda::device()?));
    /// let encoded = Encoder::encode("batch", &vec![Some(x), None])?;
    /// assert_eq!(encoded.tensor_count(), 1);
    /// # Ok(()) }
    /// ```
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Total bytes of the storages in the value.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// # use shared_tensor_runtime::payload::Encoder;
    /// let x = tch::Tensor::ones([1024], (tch::Kind::Float, shared_tensor_runtime::cuda::device()?));
    /// // A view adds no bytes: it is over the same storage.
    /// let encoded = Encoder::encode("result", &(x.shallow_clone(), x.narrow(0, 0, 512)))?;
    /// assert_eq!(encoded.storage_bytes(), 4096);
    /// # Ok(()) }
    /// ```
    pub fn storage_bytes(&self) -> u64 {
        self.storages.iter().map(|s| s.bytes).sum()
    }
}

/// Lends the storages of one caching-allocator block as one: storages of this process
/// whose descriptors name the same IPC handle (one `cudaMalloc` segment) become one storage
/// over the region they span, with the tensors' storage offsets moved to count from the
/// region's start. The receiver then opens one storage per block and builds every tensor as
/// a view of it; one lease covers the region and keeps every part alive here until the
/// receiver drops its last tensor of the block. A block whose offsets do not divide by some
/// tensor's element size (never the case for the caching allocator's 512-byte blocks),
/// whose handle is not a `cudaMalloc` segment's (an expandable segment's names the pages
/// of one block only), or that holds one storage stays as it is.
fn group_blocks(storages: Vec<EncodedStorage>, tensors: &mut [WireTensor]) -> Vec<EncodedStorage> {
    let mut by_block: HashMap<(&[u8], [u8; 16]), Vec<usize>> = HashMap::new();
    for (i, s) in storages.iter().enumerate() {
        if let Source::Own(d) = &s.source {
            if ipc::is_cuda_malloc_handle(&d.handle) {
                by_block.entry((&d.handle, d.device.uuid)).or_default().push(i);
            }
        }
    }
    let mut groups: Vec<Vec<usize>> = by_block.into_values().filter(|members| members.len() > 1).collect();
    if groups.is_empty() {
        return storages;
    }
    groups.sort_unstable();
    let descriptor = |i: usize| storages[i].descriptor();
    // Per group: its region (offset, end) in the block, if every tensor's shift divides.
    let regions: Vec<Option<(i64, i64)>> = groups
        .iter()
        .map(|members| {
            let start = members.iter().map(|&i| descriptor(i).offset).min()?;
            let end =
                members.iter().map(|&i| descriptor(i).offset.checked_add(descriptor(i).nbytes as i64)).max()??;
            let fits = tensors.iter().all(|t| {
                !members.contains(&(t.storage as usize))
                    || (descriptor(t.storage as usize).offset - start) % t.view.dtype.itemsize() as i64 == 0
            });
            fits.then_some((start, end))
        })
        .collect();
    // Where each old storage goes: its group's new storage, or itself.
    let mut group_of: Vec<Option<usize>> = vec![None; storages.len()];
    for (g, members) in groups.iter().enumerate() {
        if regions[g].is_some() {
            members.iter().for_each(|&i| group_of[i] = Some(g));
        }
    }
    let mut region_holds: Vec<Option<ffi::OwnedStorage>> = groups
        .iter()
        .zip(&regions)
        .map(|(members, region)| {
            let (start, end) = (*region)?;
            let first = &storages[members[0]];
            let base = first.base - (first.descriptor().offset - start) as u64;
            let parts: Vec<&ffi::OwnedStorage> = members.iter().map(|&i| &storages[i].hold).collect();
            // Grouping is an optimisation: if C++ cannot build the region, lend the parts.
            ffi::group_storages(&parts, base, (end - start) as u64).ok()
        })
        .collect();
    for (g, hold) in region_holds.iter().enumerate() {
        if hold.is_none() {
            groups[g].iter().for_each(|&i| group_of[i] = None);
        }
    }
    for t in tensors.iter_mut() {
        if let Some(g) = group_of[t.storage as usize] {
            let (start, _) = regions[g].expect("grouped storages have a region");
            let shift = (descriptor(t.storage as usize).offset - start) / t.view.dtype.itemsize() as i64;
            t.view.storage_offset += shift;
        }
    }
    let mut new_index: Vec<u32> = vec![0; storages.len()];
    let mut group_index: Vec<Option<u32>> = vec![None; groups.len()];
    let mut out: Vec<EncodedStorage> = Vec::with_capacity(storages.len());
    let bytes: Vec<u64> = groups.iter().map(|members| members.iter().map(|&i| storages[i].bytes).sum()).collect();
    for (i, s) in storages.into_iter().enumerate() {
        match group_of[i] {
            None => {
                new_index[i] = out.len() as u32;
                out.push(s);
            }
            Some(g) => match group_index[g] {
                Some(index) => new_index[i] = index,
                None => {
                    let (start, end) = regions[g].expect("grouped storages have a region");
                    let Source::Own(d) = s.source else { unreachable!("only own storages are grouped") };
                    let base = s.base - (d.offset - start) as u64;
                    let descriptor = StorageDescriptor { offset: start, nbytes: (end - start) as u64, ..d };
                    let hold = region_holds[g].take().expect("grouped storages have a hold");
                    group_index[g] = Some(out.len() as u32);
                    new_index[i] = out.len() as u32;
                    out.push(EncodedStorage { source: Source::Own(descriptor), hold, base, bytes: bytes[g] });
                }
            },
        }
    }
    for t in tensors.iter_mut() {
        t.storage = new_index[t.storage as usize];
    }
    out
}

/// Turns a value into an [`Encoded`]: used by [`Payload::encode`] implementations.
///
/// ```no_run
/// // A hand-written `encode`, as `#[derive(shared_tensor::Payload)]` would write it.
/// use shared_tensor_runtime::payload::{Decoder, Encoder, Node, Payload};
/// struct Embeddings { table: tch::Tensor, vocab: i64 }
/// impl Payload for Embeddings {
///     fn encode(&self, enc: &mut Encoder) -> shared_tensor_runtime::Result<Node> {
///         let table = enc.field("table", |enc| enc.tensor(&self.table))?;
///         let vocab = enc.field("vocab", |enc| enc.data(&self.vocab))?;
///         Ok(Node::Map(vec![("table".into(), table), ("vocab".into(), vocab)]))
///     }
/// #   fn decode(_: Node, _: &mut Decoder) -> shared_tensor_runtime::Result<Self> { unimplemented!() }
/// #   fn alias(&self) -> shared_tensor_runtime::Result<Self> { unimplemented!() }
/// }
/// ```
pub struct Encoder {
    storages: Vec<EncodedStorage>,
    storage_index: HashMap<(u64, u64, i32), u32>,
    blocks: ipc::BlockHandles,
    tensors: Vec<WireTensor>,
    devices: Vec<GpuId>,
    path: Path,
}

impl Encoder {
    /// An encoder whose error messages name the value `root` (a parameter name, `result`).
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::Encoder;
    /// let mut enc = Encoder::new("steps");
    /// let node = enc.data(&8i64)?;
    /// assert_eq!(enc.finish(node).tensor_count(), 0);
    /// # Ok(()) }
    /// ```
    pub fn new(root: &str) -> Encoder {
        Encoder {
            storages: Vec::new(),
            storage_index: HashMap::new(),
            blocks: ipc::BlockHandles::default(),
            tensors: Vec::new(),
            devices: Vec::new(),
            path: Path::rooted(root),
        }
    }

    /// Encodes a whole payload.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::Encoder;
    /// let device = shared_tensor_runtime::cuda::device()?;
    /// let w = tch::Tensor::randn([4, 4], (tch::Kind::Float, device));
    /// let b = tch::Tensor::zeros([4], (tch::Kind::Float, device));
    /// let encoded = Encoder::encode("result", &(w, b))?;
    /// assert_eq!(encoded.tensor_count(), 2);
    /// # Ok(()) }
    /// ```
    pub fn encode<P: Payload>(root: &str, value: &P) -> Result<Encoded> {
        let mut enc = Encoder::new(root);
        let node = value.encode(&mut enc)?;
        Ok(enc.finish(node))
    }

    /// Finishes with the value's root node.
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let mut enc = Encoder::new("config");
    /// let root = Node::Seq(vec![enc.index(0, |enc| enc.data(&0.5f64))?, enc.index(1, |enc| enc.data("fp16"))?]);
    /// let encoded = enc.finish(root);
    /// assert_eq!(encoded.storage_count(), 0);
    /// # Ok(()) }
    /// ```
    pub fn finish(self, root: Node) -> Encoded {
        let mut tensors = self.tensors;
        let storages = group_blocks(self.storages, &mut tensors);
        Encoded { storages, tensors, devices: self.devices, root }
    }

    /// Where the encoder is, for error messages (`encoder.layers[3].weight`).
    ///
    /// ```
    /// use shared_tensor_runtime::payload::Encoder;
    /// let mut enc = Encoder::new("result");
    /// let msg = enc.field("layers", |enc| enc.index(3, |enc| format!("{}: hidden size must be even", enc.path())));
    /// assert_eq!(msg, "result.layers[3]: hidden size must be even");
    /// ```
    pub fn path(&self) -> String {
        self.path.to_string()
    }

    /// Encodes a named part (a struct field).
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let mut enc = Encoder::new("config");
    /// let eps = enc.field("eps", |enc| enc.data(&1e-5f64))?;
    /// let root = Node::Map(vec![("eps".into(), eps)]);
    /// # Ok(()) }
    /// ```
    pub fn field<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Field(name.to_string()), f)
    }

    /// Encodes a numbered part (a sequence element).
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let mut enc = Encoder::new("sizes");
    /// let sizes = [128i64, 256, 512];
    /// let nodes = sizes.iter().enumerate().map(|(i, s)| enc.index(i, |enc| enc.data(s)));
    /// let nodes: Vec<Node> = nodes.collect::<Result<_, _>>()?;
    /// assert_eq!(nodes.len(), 3);
    /// # Ok(()) }
    /// ```
    pub fn index<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Index(i), f)
    }

    /// Encodes a map entry.
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let mut enc = Encoder::new("scales");
    /// let mut entries = Vec::new();
    /// for (name, scale) in [("q_proj", 0.5f64), ("k_proj", 0.25)] {
    ///     entries.push((name.to_string(), enc.key(name, |enc| enc.data(&scale))?));
    /// }
    /// let root = Node::Map(entries);
    /// # Ok(()) }
    /// ```
    pub fn key<T>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Key(key.to_string()), f)
    }

    /// Encodes a tensor: checks it is a shareable CUDA tensor, exports its storage once
    /// per message, and records the view.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let x = tch::Tensor::randn([4, 4], (tch::Kind::Float, shared_tensor_runtime::cuda::device()?));
    /// let mut enc = Encoder::new("x");
    /// let node = enc.tensor(&x)?;
    /// assert_eq!(node, Node::Tensor(0));
    /// let encoded = enc.finish(node);
    /// # Ok(()) }
    /// ```
    pub fn tensor(&mut self, t: &Tensor) -> Result<Node> {
        let path = self.path.clone();
        let ins = ipc::inspect(t, &|| path.to_string())?;
        crate::cuda::require()?;
        let key = (ins.meta.storage_base, ins.meta.storage_nbytes, ins.meta.device_index);
        let storage = match self.storage_index.get(&key) {
            Some(index) => *index,
            None => {
                let source = if ins.meta.import_cookie != 0 {
                    match lease::imported_descriptor(ins.meta.import_cookie) {
                        Some(d) => Source::Imported(ins.meta.import_cookie, d),
                        None => Source::Own(self.blocks.describe(&ins)?),
                    }
                } else {
                    Source::Own(self.blocks.describe(&ins)?)
                };
                let gpu = match &source {
                    Source::Own(d) | Source::Imported(_, d) => d.device,
                };
                if !self.devices.iter().any(|g| g.uuid == gpu.uuid) {
                    self.devices.push(GpuId::of_device(ins.meta.device_index.max(0) as u32)?);
                }
                let index = self.storages.len() as u32;
                let (base, bytes) = (ins.meta.storage_base, ins.meta.storage_nbytes);
                self.storages.push(EncodedStorage { source, hold: ins.storage, base, bytes });
                self.storage_index.insert(key, index);
                index
            }
        };
        self.tensors.push(WireTensor { storage, view: ins.view });
        Ok(Node::Tensor(self.tensors.len() as u32 - 1))
    }

    /// Encodes a plain value as MessagePack.
    ///
    /// ```
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// use shared_tensor_runtime::payload::{Encoder, Node};
    /// let mut enc = Encoder::new("shape");
    /// let node = enc.data(&vec![2i64, 3, 4])?;
    /// assert!(matches!(node, Node::Data(_)));
    /// # Ok(()) }
    /// ```
    pub fn data<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<Node> {
        rmp_serde::to_vec(value)
            .map(Node::Data)
            .map_err(|e| Error::Protocol(format!("cannot serialize {}: {e}", self.path)))
    }

    /// Runs `f` and checks what it encoded as a module: at least one tensor, all on one GPU.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Encoder, Node};
    /// # struct Scale { weight: tch::Tensor, bias: tch::Tensor }
    /// # fn encode(this: &Scale, enc: &mut Encoder) -> shared_tensor_runtime::Result<Node> {
    /// // Refuses a layer that holds no tensor, or whose tensors are on two GPUs.
    /// enc.module(|enc| {
    ///     let weight = enc.field("weight", |enc| enc.tensor(&this.weight))?;
    ///     let bias = enc.field("bias", |enc| enc.tensor(&this.bias))?;
    ///     Ok(Node::Map(vec![("weight".into(), weight), ("bias".into(), bias)]))
    /// })
    /// # }
    /// ```
    pub fn module(&mut self, f: impl FnOnce(&mut Self) -> Result<Node>) -> Result<Node> {
        let first = self.tensors.len();
        let node = f(self)?;
        let tensors = &self.tensors[first..];
        if tensors.is_empty() {
            return Err(Error::Unsupported {
                path: self.path.to_string(),
                reason: "a module must hold at least one CUDA tensor".into(),
            });
        }
        let device_of = |t: &WireTensor| self.storages[t.storage as usize].descriptor().device;
        let first_device = device_of(&tensors[0]);
        if let Some(other) = tensors.iter().map(device_of).find(|d| d.uuid != first_device.uuid) {
            return Err(Error::Unsupported {
                path: self.path.to_string(),
                reason: format!(
                    "a module's tensors must all be on one GPU, found cuda:{} and cuda:{}",
                    first_device.index, other.index
                ),
            });
        }
        Ok(node)
    }
}

/// A storage of a received message.
enum Slot {
    /// To open by IPC on first use; releases `lease` to the sender when done.
    Remote { descriptor: StorageDescriptor, lease: u64 },
    /// This process's own storage, come back.
    Local(ffi::OwnedStorage),
    /// A lease of ours that the peer named but we no longer have.
    Missing(u64),
    /// Opened.
    Open(ffi::OwnedStorage),
}

/// A message as received: storages that came home are pinned at once (before any later
/// release message could drop them).
pub(crate) struct Received {
    slots: Vec<Slot>,
    tensors: Vec<WireTensor>,
    ready: Vec<(GpuId, EventHandle)>,
    root: Node,
    link: Arc<Link>,
}

impl WirePayload {
    /// Pins the storages that are `link`'s own. Must run in message order.
    pub(crate) fn receive(self, link: &Arc<Link>) -> Received {
        let slots = self
            .storages
            .into_iter()
            .map(|s| match s {
                WireStorage::Shared { storage, lease } => Slot::Remote { descriptor: storage, lease },
                WireStorage::Returned { lease } => match link.lent_storage(lease) {
                    Some(storage) => Slot::Local(storage),
                    None => Slot::Missing(lease),
                },
            })
            .collect();
        Received { slots, tensors: self.tensors, ready: self.ready, root: self.root, link: link.clone() }
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        // Storages lent to us that we never opened: give the leases back now.
        for slot in &self.slots {
            if let Slot::Remote { lease, .. } = slot {
                self.link.release_unopened(*lease);
            }
        }
    }
}

/// Turns a received value back into Rust values: used by [`Payload::decode`] implementations.
///
/// ```no_run
/// // A hand-written `decode`, as `#[derive(shared_tensor::Payload)]` would write it.
/// use shared_tensor_runtime::payload::{nn::Fields, Decoder, Encoder, Node, Payload};
/// struct Embeddings { table: tch::Tensor, vocab: i64 }
/// impl Payload for Embeddings {
/// #   fn encode(&self, _: &mut Encoder) -> shared_tensor_runtime::Result<Node> { unimplemented!() }
///     fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<Self> {
///         // `table` comes back as a view of the sender's GPU memory: no copy.
///         let mut fields = Fields::new(node, dec)?;
///         Ok(Embeddings { table: fields.take(dec, "table")?, vocab: fields.take_data(dec, "vocab")? })
///     }
/// #   fn alias(&self) -> shared_tensor_runtime::Result<Self> { unimplemented!() }
/// }
/// ```
pub struct Decoder {
    received: Received,
    waited: bool,
    opened_remote: bool,
    path: Path,
}

impl Decoder {
    pub(crate) fn new(received: Received, root: &str) -> Decoder {
        Decoder { received, waited: false, opened_remote: false, path: Path::rooted(root) }
    }

    /// Takes the root node out (leaving `()`).
    pub(crate) fn take_root(&mut self) -> Node {
        std::mem::replace(&mut self.received.root, Node::Unit)
    }

    /// Where the decoder is, for error messages.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # use shared_tensor_runtime::{Error, Result};
    /// # fn decode(node: Node, dec: &mut Decoder) -> Result<tch::Tensor> {
    /// let table = dec.tensor(node)?;
    /// if table.dim() != 2 {
    ///     return Err(Error::Protocol(format!("{}: expected a 2-d table", dec.path())));
    /// }
    /// # Ok(table) }
    /// ```
    pub fn path(&self) -> String {
        self.path.to_string()
    }

    /// Decodes a named part.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<tch::Tensor> {
    /// // Errors name the part: `result.weight: expected a tensor, got a map`.
    /// let weight = dec.field("weight", |dec| dec.tensor(node))?;
    /// # Ok(weight) }
    /// ```
    pub fn field<T>(&mut self, name: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Field(name.to_string()), f)
    }

    /// Decodes a numbered part.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<Vec<tch::Tensor>> {
    /// let Node::Seq(nodes) = node else { return Err(dec.mismatch("a sequence", &node)) };
    /// nodes.into_iter().enumerate().map(|(i, n)| dec.index(i, |dec| dec.tensor(n))).collect()
    /// # }
    /// ```
    pub fn index<T>(&mut self, i: usize, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Index(i), f)
    }

    /// Decodes a map entry.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<Vec<(String, tch::Tensor)>> {
    /// let Node::Map(entries) = node else { return Err(dec.mismatch("a map", &node)) };
    /// entries.into_iter().map(|(k, n)| Ok((k.clone(), dec.key(&k, |dec| dec.tensor(n))?))).collect()
    /// # }
    /// ```
    pub fn key<T>(&mut self, key: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        self.scoped(Seg::Key(key.to_string()), f)
    }

    /// The error for a node of the wrong shape.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<Option<tch::Tensor>> {
    /// match node {
    ///     Node::Opt(Some(inner)) => dec.tensor(*inner).map(Some),
    ///     Node::Opt(None) => Ok(None),
    ///     other => Err(dec.mismatch("an Option", &other)),
    /// }
    /// # }
    /// ```
    pub fn mismatch(&self, expected: &str, got: &Node) -> Error {
        Error::Protocol(format!("{}: expected {expected}, got {}", self.path, got.kind()))
    }

    /// The tensor a [`Node::Tensor`] names: a view of the sender's memory (or of this
    /// process's own, come back).
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
    /// let weight = dec.tensor(node)?;
    /// assert!(weight.device().is_cuda());
    /// # Ok(()) }
    /// ```
    pub fn tensor(&mut self, node: Node) -> Result<Tensor> {
        let Node::Tensor(index) = node else {
            return Err(self.mismatch("a tensor", &node));
        };
        let Some(storage) = self.received.tensors.get(index as usize).map(|t| t.storage) else {
            return Err(Error::Protocol(format!("{}: tensor #{index} is not in the message", self.path)));
        };
        self.wait_ready()?;
        self.open_remote()?;
        self.open(storage)?;
        let Slot::Open(opened) = &self.received.slots[storage as usize] else { unreachable!("just opened") };
        ipc::view_tensor(opened, &self.received.tensors[index as usize].view).map_err(|e| match e {
            Error::Cuda { message, .. } => {
                Error::Protocol(format!("{}: the tensor does not fit its storage: {message}", self.path))
            }
            other => other,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        if self.waited {
            return Ok(());
        }
        self.waited = true;
        for (gpu, event) in &self.received.ready {
            event.wait(gpu.local_index()?)?;
        }
        Ok(())
    }

    /// Opens every storage the peer lent in this message, in one call (once): storages of
    /// one allocator block share one mapping. On error nothing is opened, and the leases
    /// go back to the peer when the message is dropped.
    fn open_remote(&mut self) -> Result<()> {
        if self.opened_remote {
            return Ok(());
        }
        let remote: Vec<(usize, &StorageDescriptor, u64)> = self
            .received
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, slot)| match slot {
                Slot::Remote { descriptor, lease } => Some((i, descriptor, *lease)),
                _ => None,
            })
            .collect();
        if remote.is_empty() {
            self.opened_remote = true;
            return Ok(());
        }
        let first = lease::new_cookies(remote.len());
        let descs: Vec<(&StorageDescriptor, u64)> =
            remote.iter().enumerate().map(|(k, (_, d, _))| (*d, first + k as u64)).collect();
        let opened = ipc::open_storages(&descs, &|k| format!("{}: storage {}", self.path, remote[k].0))?;
        let indices: Vec<usize> = remote.iter().map(|(i, _, _)| *i).collect();
        let mut records = Vec::with_capacity(indices.len());
        for ((k, index), storage) in indices.into_iter().enumerate().zip(opened) {
            let Slot::Remote { descriptor, lease } =
                std::mem::replace(&mut self.received.slots[index], Slot::Open(storage))
            else {
                unreachable!("collected as remote above")
            };
            records.push((first + k as u64, lease, descriptor));
        }
        lease::register_imports(&self.received.link, records);
        self.opened_remote = true;
        Ok(())
    }

    /// Makes storage `index` of the message usable (once): its slot is `Slot::Open` after
    /// this. Remote storages were opened by [`Decoder::open_remote`].
    fn open(&mut self, index: u32) -> Result<()> {
        let slot = self
            .received
            .slots
            .get_mut(index as usize)
            .ok_or_else(|| Error::Protocol(format!("storage #{index} is not in the message")))?;
        let opened = match slot {
            Slot::Local(storage) => storage.clone_ref(),
            Slot::Remote { .. } => unreachable!("remote storages are opened first"),
            Slot::Missing(lease) => {
                return Err(Error::Protocol(format!(
                    "{}: the peer returned storage lease {lease}, which this process no longer holds",
                    self.path
                )))
            }
            Slot::Open(_) => return Ok(()),
        };
        *slot = Slot::Open(opened);
        Ok(())
    }

    /// Decodes a plain value from MessagePack.
    ///
    /// ```no_run
    /// # use shared_tensor_runtime::payload::{Decoder, Node};
    /// # fn decode(node: Node, dec: &mut Decoder) -> shared_tensor_runtime::Result<()> {
    /// let shape: Vec<i64> = dec.data(node)?;
    /// # Ok(()) }
    /// ```
    pub fn data<T: DeserializeOwned>(&mut self, node: Node) -> Result<T> {
        let Node::Data(bytes) = node else {
            return Err(self.mismatch("a plain value", &node));
        };
        rmp_serde::from_slice(&bytes)
            .map_err(|e| Error::Protocol(format!("{}: not a {}: {e}", self.path, std::any::type_name::<T>())))
    }
}

/// A value that carries GPU memory and can be an endpoint's result (or argument).
///
/// Implemented for `tch::Tensor`, `()`, `Option<P>`, `Box<P>`, `Vec<P>`, tuples of up to
/// 8 payloads, `HashMap<String, P>`, `BTreeMap<String, P>`, tch's nn modules and
/// `nn::VarStore`; derive it for your own structs and enums with
/// `#[derive(shared_tensor::Payload)]`.
///
/// ```
/// use shared_tensor_runtime::payload::Payload;
/// use tch::Tensor;
/// fn alias_all<P: Payload>(p: &P) -> P { p.alias().unwrap() }
/// let t = Tensor::ones([2], (tch::Kind::Float, tch::Device::Cpu));
/// let a = alias_all(&vec![t]);
/// assert_eq!(a.len(), 1);
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot cross a #[share] endpoint as a payload",
    label = "not a payload: it carries no GPU memory that CUDA IPC could share",
    note = "a result must carry GPU memory: a CUDA tch::Tensor, a tch nn module, nn::VarStore, \
            your struct with #[derive(shared_tensor::Payload)], or (), Option, Vec, tuples and \
            String-keyed maps of those",
    note = "plain values (numbers, strings, serde types) can be arguments, or fields of a derived \
            payload struct, but not a whole result: wrap them with a tensor in a struct"
)]
pub trait Payload: Send + Sized + 'static {
    /// Encodes the value (tensors through [`Encoder::tensor`]).
    fn encode(&self, enc: &mut Encoder) -> Result<Node>;
    /// Rebuilds the value from its node.
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self>;
    /// Another value over the same GPU memory (tensors are shallow clones).
    fn alias(&self) -> Result<Self>;
}

/// Marks an argument that travels as a payload (by CUDA IPC).
///
/// ```
/// use shared_tensor_runtime::payload::{Argument, ByIpc};
/// fn by_ipc<A: Argument<ByIpc>>() {}
/// by_ipc::<tch::Tensor>();
/// by_ipc::<Vec<Option<tch::Tensor>>>();
/// ```
#[derive(Debug)]
pub enum ByIpc {}
/// Marks an argument that travels by value (MessagePack).
///
/// ```
/// use shared_tensor_runtime::payload::{Argument, ByValue};
/// fn by_value<A: Argument<ByValue>>() {}
/// by_value::<f64>();
/// by_value::<Vec<String>>();
/// ```
#[derive(Debug)]
pub enum ByValue {}

/// A value that can be an argument of a `#[share]` endpoint: a [`Payload`] (sent by CUDA
/// IPC) or a plain serde value (sent as MessagePack). `Via` is inferred.
///
/// ```
/// use shared_tensor_runtime::payload::Argument;
/// fn takes_argument<A: Argument<V>, V>() {}
/// takes_argument::<i64, _>();
/// takes_argument::<String, _>();
/// takes_argument::<tch::Tensor, _>();
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be an argument of a #[share] endpoint",
    label = "neither a payload nor a plain serde value",
    note = "arguments are payloads (CUDA tensors, tch nn modules, #[derive(shared_tensor::Payload)] \
            types and containers of them) or plain values implementing serde's Serialize + \
            DeserializeOwned + Clone"
)]
pub trait Argument<Via>: Send + Sized + 'static {
    /// Encodes the argument.
    fn encode_arg(&self, enc: &mut Encoder) -> Result<Node>;
    /// Rebuilds it.
    fn decode_arg(node: Node, dec: &mut Decoder) -> Result<Self>;
    /// An owned copy for running later (tensors are aliased, plain values cloned).
    fn to_owned_arg(&self) -> Result<Self>;
}

impl<P: Payload> Argument<ByIpc> for P {
    fn encode_arg(&self, enc: &mut Encoder) -> Result<Node> {
        self.encode(enc)
    }
    fn decode_arg(node: Node, dec: &mut Decoder) -> Result<Self> {
        P::decode(node, dec)
    }
    fn to_owned_arg(&self) -> Result<Self> {
        self.alias()
    }
}

impl<T: Serialize + DeserializeOwned + Clone + Send + 'static> Argument<ByValue> for T {
    fn encode_arg(&self, enc: &mut Encoder) -> Result<Node> {
        enc.data(self)
    }
    fn decode_arg(node: Node, dec: &mut Decoder) -> Result<Self> {
        dec.data(node)
    }
    fn to_owned_arg(&self) -> Result<Self> {
        Ok(self.clone())
    }
}

/// One element of an [`Args`] tuple: an [`Argument`], or a reference to one.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::payload::{ArgLike, Encoder, Node};
/// fn encode_one<V>(arg: impl ArgLike<V>) -> shared_tensor_runtime::Result<Node> {
///     arg.encode_like(&mut Encoder::new("arg0"))
/// }
/// let precision = "fp16".to_string();
/// assert_eq!(encode_one(&precision)?, encode_one(precision)?);
/// # Ok(()) }
/// ```
pub trait ArgLike<Via> {
    /// Encodes it.
    fn encode_like(&self, enc: &mut Encoder) -> Result<Node>;
}

/// Marks an argument passed by value in [`Args`].
///
/// ```
/// use shared_tensor_runtime::payload::{ArgLike, ByValue, Owned};
/// fn owned<A: ArgLike<(ByValue, Owned)>>(_: A) {}
/// owned(8i64);
/// ```
#[derive(Debug)]
pub enum Owned {}
/// Marks an argument passed by reference in [`Args`].
///
/// ```
/// use shared_tensor_runtime::payload::{ArgLike, Borrowed, ByValue};
/// fn borrowed<A: ArgLike<(ByValue, Borrowed)>>(_: A) {}
/// borrowed(&"fp16".to_string());
/// ```
#[derive(Debug)]
pub enum Borrowed {}

impl<V, A: Argument<V>> ArgLike<(V, Owned)> for A {
    fn encode_like(&self, enc: &mut Encoder) -> Result<Node> {
        self.encode_arg(enc)
    }
}

impl<V, A: Argument<V>> ArgLike<(V, Borrowed)> for &A {
    fn encode_like(&self, enc: &mut Encoder) -> Result<Node> {
        (**self).encode_arg(enc)
    }
}

/// The arguments of a call by endpoint name (manual mode): a tuple of up to 8
/// [`Argument`]s or references to them, or `()`. `Via` is inferred.
///
/// ```
/// use shared_tensor_runtime::payload::{Args, Encoder};
/// let mut enc = Encoder::new("");
/// let name = "fp16".to_string();
/// let nodes = (4i64, &name).encode_args(&mut enc).unwrap();
/// assert_eq!(nodes.len(), 2);
/// ```
pub trait Args<Via> {
    /// Encodes each argument (errors name it by position: `arg0`, `arg1`, ...).
    fn encode_args(&self, enc: &mut Encoder) -> Result<Vec<Node>>;
}

impl Args<()> for () {
    fn encode_args(&self, _: &mut Encoder) -> Result<Vec<Node>> {
        Ok(Vec::new())
    }
}

macro_rules! tuple_args {
    ($($name:ident $via:ident $idx:tt),+) => {
        impl<$($name: ArgLike<$via>, $via),+> Args<($($via,)+)> for ($($name,)+) {
            fn encode_args(&self, enc: &mut Encoder) -> Result<Vec<Node>> {
                Ok(vec![$(enc.field(concat!("arg", $idx), |enc| self.$idx.encode_like(enc))?),+])
            }
        }
    };
}

tuple_args!(A VA 0);
tuple_args!(A VA 0, B VB 1);
tuple_args!(A VA 0, B VB 1, C VC 2);
tuple_args!(A VA 0, B VB 1, C VC 2, D VD 3);
tuple_args!(A VA 0, B VB 1, C VC 2, D VD 3, E VE 4);
tuple_args!(A VA 0, B VB 1, C VC 2, D VD 3, E VE 4, F VF 5);
tuple_args!(A VA 0, B VB 1, C VC 2, D VD 3, E VE 4, F VF 5, G VG 6);
tuple_args!(A VA 0, B VB 1, C VC 2, D VD 3, E VE 4, F VF 5, G VG 6, H VH 7);

impl Payload for Tensor {
    fn encode(&self, enc: &mut Encoder) -> Result<Node> {
        enc.tensor(self)
    }
    fn decode(node: Node, dec: &mut Decoder) -> Result<Self> {
        dec.tensor(node)
    }
    fn alias(&self) -> Result<Self> {
        Ok(self.shallow_clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_rust() {
        let mut p = Path::default();
        p.0.push(Seg::Field("encoder".into()));
        p.0.push(Seg::Field("layers".into()));
        p.0.push(Seg::Index(3));
        p.0.push(Seg::Field("weight".into()));
        assert_eq!(p.to_string(), "encoder.layers[3].weight");
        p.scoped(Seg::Key("k".into()), |p: &mut Path| assert_eq!(p.to_string(), "encoder.layers[3].weight[\"k\"]"));
        assert_eq!(Path::default().to_string(), "the value");
    }

    #[test]
    fn a_cpu_tensor_deep_in_a_value_is_named_by_its_path() {
        let cpu = Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        let value = vec![(None, vec![cpu])];
        let value: Vec<(Option<Tensor>, Vec<Tensor>)> = value;
        let err = Encoder::encode("batch", &value).unwrap_err();
        assert!(err.to_string().starts_with("batch[0].1[0] is on Cpu"), "{err}");
    }

    #[test]
    fn plain_arguments_are_messagepack() {
        let mut enc = Encoder::new("n");
        let node = 42i64.encode_arg(&mut enc).unwrap();
        assert_eq!(node, Node::Data(rmp_serde::to_vec(&42i64).unwrap()));
        let node = "abc".to_string().encode_arg(&mut enc).unwrap();
        assert!(matches!(node, Node::Data(_)));
    }

    /// Storages of one block (one handle) become one storage over the region they span;
    /// every tensor, rebuilt over it, sees the very same bytes as before. CPU storages
    /// stand in for a CUDA block here: the grouping is arithmetic on addresses.
    #[test]
    fn storages_of_one_block_are_lent_as_one_region() {
        use crate::ipc::{DType, ProcessId};
        let block = Tensor::arange(256, (tch::Kind::Float, tch::Device::Cpu)); // 1024 bytes
        let ins = ffi::inspect(&block, true).unwrap();
        let whole = ins.storage.unwrap();
        let block_base = ins.meta.storage_base;
        let gpu = GpuId { index: 0, uuid: [4; 16] };
        let producer = ProcessId { pid: 1, instance: 1 };
        // (handle, byte offset in the block, nbytes): two blocks, one of them with three parts.
        let parts: [(&[u8], i64, u64); 4] =
            [(b"\x02cA", 512, 64), (b"\x02cB", 0, 16), (b"\x02cA", 128, 32), (b"\x02cA", 800, 8)];
        let mut storages = Vec::new();
        for (handle, offset, nbytes) in parts {
            let base = block_base + offset as u64;
            let hold = ffi::group_storages(&[&whole], base, nbytes).unwrap();
            let descriptor = StorageDescriptor { handle: handle.to_vec(), offset, nbytes, device: gpu, producer };
            storages.push(EncodedStorage { source: Source::Own(descriptor), hold, base, bytes: nbytes });
        }
        let view = |dtype: DType, sizes: Vec<i64>, storage_offset: i64| TensorView {
            dtype,
            strides: vec![1; sizes.len()],
            sizes,
            storage_offset,
            requires_grad: false,
        };
        let mut tensors = vec![
            WireTensor { storage: 0, view: view(DType::F32, vec![4], 2) },
            WireTensor { storage: 1, view: view(DType::F32, vec![4], 0) },
            WireTensor { storage: 2, view: view(DType::F64, vec![3], 1) },
            WireTensor { storage: 3, view: view(DType::U8, vec![8], 0) },
            WireTensor { storage: 0, view: view(DType::F32, vec![], 15) },
        ];
        let before: Vec<Tensor> =
            tensors.iter().map(|t| ipc::view_tensor(&storages[t.storage as usize].hold, &t.view).unwrap()).collect();
        let grouped = group_blocks(storages, &mut tensors);
        assert_eq!(grouped.len(), 2, "block AA's three storages are one");
        let region = grouped[tensors[0].storage as usize].descriptor();
        assert_eq!((region.offset, region.nbytes), (128, 808 - 128));
        assert_eq!(grouped[tensors[0].storage as usize].bytes, 64 + 32 + 8);
        assert_eq!(tensors.iter().map(|t| t.storage).collect::<Vec<_>>(), vec![0, 1, 0, 0, 0]);
        assert_eq!(tensors[0].view.storage_offset, 2 + (512 - 128) / 4);
        assert_eq!(tensors[2].view.storage_offset, 1);
        assert_eq!(tensors[3].view.storage_offset, 800 - 128);
        for (t, want) in tensors.iter().zip(&before) {
            let got = ipc::view_tensor(&grouped[t.storage as usize].hold, &t.view).unwrap();
            assert_eq!(got.data_ptr(), want.data_ptr());
            assert!(got.equal(want));
        }
        // A storage whose shift from the region start does not divide an element stays
        // apart, and so do an expandable segment's storages (type 'e').
        let odd = [(b"\x02cC" as &[u8], 0i64, 8u64), (b"\x02cC", 6, 8), (b"\x02eE", 0, 8), (b"\x02eE", 8, 8)];
        let mut storages = Vec::new();
        for (handle, offset, nbytes) in odd {
            let base = block_base + offset as u64;
            let hold = ffi::group_storages(&[&whole], base, nbytes).unwrap();
            let descriptor = StorageDescriptor { handle: handle.to_vec(), offset, nbytes, device: gpu, producer };
            storages.push(EncodedStorage { source: Source::Own(descriptor), hold, base, bytes: nbytes });
        }
        let mut tensors = vec![
            WireTensor { storage: 0, view: view(DType::F32, vec![2], 0) },
            WireTensor { storage: 1, view: view(DType::F32, vec![2], 0) },
            WireTensor { storage: 2, view: view(DType::F32, vec![2], 0) },
            WireTensor { storage: 3, view: view(DType::F32, vec![2], 0) },
        ];
        assert_eq!(group_blocks(storages, &mut tensors).len(), 4);
        assert_eq!(tensors.iter().map(|t| t.storage).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    }

    /// A message whose storages cannot be opened (here: no GPU, or a GPU that is not the
    /// descriptor's) builds no tensor, and every lease goes back to the peer exactly once,
    /// whether the decoder tries again or not.
    #[test]
    fn a_message_that_cannot_be_opened_gives_every_lease_back_once() {
        use crate::ipc::{DType, ProcessId};
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let link = Link::new(Box::new(move |lease, _| sink.lock().push(lease)));
        let storage = |lease| WireStorage::Shared {
            storage: StorageDescriptor {
                handle: vec![2, b'c', 9, 9],
                offset: 0,
                nbytes: 64,
                device: GpuId { index: 0, uuid: [0xee; 16] },
                producer: ProcessId { pid: 1, instance: 42 },
            },
            lease,
        };
        let view = TensorView {
            dtype: DType::F32,
            sizes: vec![16],
            strides: vec![1],
            storage_offset: 0,
            requires_grad: false,
        };
        let mut msg = WirePayload::plain(Node::Seq(vec![Node::Tensor(0), Node::Tensor(1)]));
        msg.storages = vec![storage(7), storage(8)];
        msg.tensors = vec![WireTensor { storage: 0, view: view.clone() }, WireTensor { storage: 1, view }];
        let msg = PackedPayload::pack(&msg).unwrap().unpack().unwrap();
        let mut dec = Decoder::new(msg.receive(&link), "result");
        assert!(dec.tensor(Node::Tensor(0)).is_err());
        assert!(dec.tensor(Node::Tensor(1)).is_err(), "a second try fails the same way, without a panic");
        assert!(seen.lock().is_empty(), "nothing is released while the message lives");
        drop(dec);
        assert_eq!(*seen.lock(), vec![7, 8]);
    }

    mod hostile_descriptors {
        //! The decoder refuses every descriptor that points outside its storage, naming
        //! the storage or tensor and the field; and accepts exactly the views that fit.
        use super::super::*;
        use crate::ipc::{DType, ProcessId, DTYPES};
        use proptest::prelude::*;

        fn shared(offset: i64, nbytes: u64) -> WireStorage {
            WireStorage::Shared {
                storage: StorageDescriptor {
                    handle: vec![7; 66],
                    offset,
                    nbytes,
                    device: GpuId { index: 0, uuid: [1; 16] },
                    producer: ProcessId { pid: 2, instance: 3 },
                },
                lease: 1,
            }
        }

        fn view(dtype: DType, sizes: Vec<i64>, strides: Vec<i64>, storage_offset: i64) -> TensorView {
            TensorView { dtype, sizes, strides, storage_offset, requires_grad: false }
        }

        /// `storages` and one tensor over storage 0, packed and decoded as a peer's would be.
        fn decode(storages: Vec<WireStorage>, view: TensorView) -> Result<WirePayload> {
            let mut msg = WirePayload::plain(Node::Tensor(0));
            msg.storages = storages;
            msg.tensors.push(WireTensor { storage: 0, view });
            PackedPayload::pack(&msg)?.unpack()
        }

        fn refusal(storages: Vec<WireStorage>, view: TensorView) -> String {
            match decode(storages, view) {
                Err(Error::Protocol(message)) => message,
                other => panic!("expected a protocol error, got {other:?}"),
            }
        }

        /// Bytes a non-empty view needs, computed wide: `None` when past 64 bits.
        fn needed(v: &TensorView) -> Option<u64> {
            // Each product fits 127 bits; their sum may not.
            let end = v.sizes.iter().zip(&v.strides).try_fold(i128::from(v.storage_offset) + 1, |end, (s, t)| {
                end.checked_add(i128::from(s - 1) * i128::from(*t))
            })?;
            if end > i128::from(i64::MAX) {
                return None;
            }
            u64::try_from(end * i128::from(v.dtype.itemsize())).ok()
        }

        #[test]
        fn each_field_is_named() {
            let ok = view(DType::F32, vec![4], vec![1], 0);
            assert!(decode(vec![shared(0, 16)], ok.clone()).is_ok());
            let err = refusal(vec![shared(-4096, 16)], ok.clone());
            assert_eq!(err, "malformed payload: storage 0: offset -4096 is negative");
            let err = refusal(vec![shared(i64::MAX, 16)], ok.clone());
            assert!(err.contains("storage 0: offset 9223372036854775807 + nbytes 16 overflows"), "{err}");
            let err = refusal(vec![shared(0, 15)], ok.clone());
            assert!(err.contains("tensor 0: the view (sizes [4], strides [1], 4-byte elements)"), "{err}");
            assert!(err.ends_with("needs 16 bytes but the storage has 15"), "{err}");
            let err = refusal(vec![shared(0, 16)], view(DType::F32, vec![2, -1], vec![1, 1], 0));
            assert!(err.contains("tensor 0: size -1 of dimension 1 is negative"), "{err}");
            let err = refusal(vec![shared(0, 16)], view(DType::F32, vec![2], vec![-1], 1));
            assert!(err.contains("tensor 0: stride -1 of dimension 0 is negative"), "{err}");
            let err = refusal(vec![shared(0, 16)], view(DType::F32, vec![1], vec![1], -1));
            assert!(err.contains("tensor 0: storage_offset -1 is negative"), "{err}");
            let err = refusal(vec![shared(0, 16)], view(DType::F32, vec![2, 2], vec![i64::MAX, 1], 0));
            assert!(
                err.contains("tensor 0: the view") && err.ends_with("more bytes than a 64-bit count holds"),
                "{err}"
            );
            let err = refusal(vec![], ok.clone());
            assert!(err.contains("tensor 0: storage 0 is not in the message (0 storages)"), "{err}");
            let mut no_handle = shared(0, 16);
            if let WireStorage::Shared { storage, .. } = &mut no_handle {
                storage.handle.clear();
            }
            let err = refusal(vec![no_handle], ok);
            assert!(err.contains("storage 0: nbytes 16 with no IPC handle"), "{err}");
            // A returned storage's size is this process's to know: only the shape is checked.
            let back = vec![WireStorage::Returned { lease: 3 }];
            assert!(decode(back.clone(), view(DType::F32, vec![1 << 40], vec![1], 0)).is_ok());
            let err = refusal(back, view(DType::F32, vec![1], vec![-2], 0));
            assert!(err.contains("tensor 0: stride -2"), "{err}");
        }

        proptest! {
            #[test]
            fn storages_are_accepted_exactly_when_inside_64_bits(offset in any::<i64>(), nbytes in any::<u64>()) {
                let ok = view(DType::U8, vec![0], vec![1], 0);
                let fits = offset >= 0 && (offset as u128) + (nbytes as u128) <= i64::MAX as u128;
                match decode(vec![shared(offset, nbytes)], ok) {
                    Ok(_) => prop_assert!(fits),
                    Err(Error::Protocol(m)) => {
                        prop_assert!(!fits, "{}", m);
                        prop_assert!(m.starts_with(&format!("malformed payload: storage 0: offset {offset}")), "{}", m);
                    }
                    Err(other) => prop_assert!(false, "{}", other),
                }
            }

            #[test]
            fn views_are_accepted_exactly_when_inside_their_storage(
                d in 0..17usize,
                dims in proptest::collection::vec((0..i64::MAX, 0..i64::MAX), 0..4),
                small in proptest::collection::vec((0..6i64, 0..40i64), 0..4),
                storage_offset in prop_oneof![0..64i64, 0..i64::MAX],
                nbytes in prop_oneof![0..4096u64, 0..(i64::MAX as u64)],
                use_small in any::<bool>(),
            ) {
                let dims = if use_small { small } else { dims };
                let (sizes, strides): (Vec<i64>, Vec<i64>) = dims.into_iter().unzip();
                let v = view(DTYPES[d].0, sizes, strides, storage_offset);
                let fits = v.sizes.contains(&0) || needed(&v).is_some_and(|need| need <= nbytes);
                match decode(vec![shared(0, nbytes)], v.clone()) {
                    Ok(_) => prop_assert!(fits, "{:?} accepted over {} bytes", v, nbytes),
                    Err(Error::Protocol(m)) => {
                        prop_assert!(!fits, "{}", m);
                        prop_assert!(m.starts_with("malformed payload: tensor 0: the view"), "{}", m);
                        match needed(&v) {
                            Some(need) => {
                                let tail = format!("needs {need} bytes but the storage has {nbytes}");
                                prop_assert!(m.ends_with(&tail), "{}", m);
                            }
                            None => prop_assert!(m.ends_with("more bytes than a 64-bit count holds"), "{}", m),
                        }
                    }
                    Err(other) => prop_assert!(false, "{}", other),
                }
            }

            #[test]
            fn negative_sizes_strides_and_offsets_are_refused_by_name(
                dims in proptest::collection::vec((0..1000i64, 0..1000i64), 1..5),
                which in 0..3usize,
                at in any::<prop::sample::Index>(),
                negative in i64::MIN..0,
            ) {
                let (mut sizes, mut strides): (Vec<i64>, Vec<i64>) = dims.into_iter().unzip();
                let dim = at.index(sizes.len());
                let mut storage_offset = 0;
                let field = match which {
                    0 => { sizes[dim] = negative; format!("size {negative} of dimension {dim} is negative") }
                    1 => { strides[dim] = negative; format!("stride {negative} of dimension {dim} is negative") }
                    _ => { storage_offset = negative; format!("storage_offset {negative} is negative") }
                };
                let m = refusal(vec![shared(0, u32::MAX as u64)], view(DType::F64, sizes, strides, storage_offset));
                prop_assert!(m.starts_with(&format!("malformed payload: tensor 0: {field}")), "{}", m);
            }

            #[test]
            fn mismatched_dimension_counts_are_refused(sizes in proptest::collection::vec(0..8i64, 0..5), extra in 1..3usize) {
                let strides = vec![1; sizes.len() + extra];
                let m = refusal(vec![shared(0, 1 << 20)], view(DType::F32, sizes.clone(), strides, 0));
                let expected = format!("tensor 0: {} sizes but {} strides", sizes.len(), sizes.len() + extra);
                prop_assert!(m.ends_with(&expected), "{}", m);
            }
        }
    }

    #[test]
    fn empty_payloads_carry_no_storage() {
        let e = Encoder::encode("result", &()).unwrap();
        assert_eq!((e.storage_count(), e.tensor_count()), (0, 0));
        let e = Encoder::encode("result", &None::<Tensor>).unwrap();
        assert_eq!(e.root, Node::Opt(None));
    }
}
