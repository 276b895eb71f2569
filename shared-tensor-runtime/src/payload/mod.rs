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

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::device::ffi;
use crate::device::ipc::{self, EventHandle, GpuId, StorageDescriptor, TensorView};
use crate::device::lease::{self, Link, Origin};
use crate::error::{Error, Result};

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

/// A region of an allocator block that a message lends: one IPC handle, one mapping and
/// one lease for every storage of the sender that lies in it (its *parts*, see
/// [`WireStorage::Part`]).
///
/// ```
/// use shared_tensor_runtime::payload::{Node, WirePayload};
/// // The bytes of GPU memory a message makes the receiver map.
/// fn mapped_bytes(msg: &WirePayload) -> u64 {
///     msg.regions.iter().map(|r| r.storage.nbytes).sum()
/// }
/// assert_eq!(mapped_bytes(&WirePayload::plain(Node::Unit)), 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireRegion {
    /// Where the memory is: the region's handle, offset in its block and size.
    pub storage: StorageDescriptor,
    /// The sender's lease; the receiver releases it when it has dropped every storage
    /// over the region's parts.
    pub lease: u64,
}

/// A storage in a message: one storage of the sender, which the receiver rebuilds as one
/// storage of its own (tensors that shared a storage share one again, tensors that did not
/// do not).
///
/// ```
/// use shared_tensor_runtime::payload::{Node, WirePayload, WireStorage};
/// // The bytes of the sender's storages a message lends (a region's gaps not counted).
/// fn lent_bytes(msg: &WirePayload) -> u64 {
///     let bytes = |s: &WireStorage| match s {
///         WireStorage::Part { nbytes, .. } => *nbytes,
///         WireStorage::Returned { .. } => 0,
///     };
///     msg.storages.iter().map(bytes).sum()
/// }
/// assert_eq!(lent_bytes(&WirePayload::plain(Node::Unit)), 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireStorage {
    /// `nbytes` bytes from byte `offset` of region `region`, which the receiver opens by
    /// IPC. Its index among the parts of its region (in table order) is what the sender's
    /// lease knows it by.
    Part {
        /// Index into the region table.
        region: u32,
        /// Byte offset in the region.
        offset: u64,
        /// Size in bytes.
        nbytes: u64,
    },
    /// Memory the receiver lent to the sender: part `part` of the receiver's lease `lease`,
    /// the receiver's own storage.
    Returned {
        /// The receiver's lease.
        lease: u64,
        /// The part's index in that lease.
        part: u32,
    },
}

/// A tensor in a message: a view of one of the message's storages.
///
/// ```
/// use shared_tensor_runtime::ipc::{DType, TensorView};
/// use shared_tensor_runtime::payload::WireTensor;
/// let (sizes, strides) = (vec![4].into(), vec![1].into());
/// let view = TensorView { dtype: DType::F32, sizes, strides, storage_offset: 0, requires_grad: false };
/// let whole = WireTensor { storage: 0, view };
/// // Its last two elements: another tensor over the same storage entry.
/// let tail = WireTensor { storage: 0, view: TensorView { sizes: vec![2].into(), storage_offset: 2, ..whole.view.clone() } };
/// assert_eq!(whole.storage, tail.storage);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireTensor {
    /// Index into the storage table.
    pub storage: u32,
    /// How it looks at the storage.
    pub view: TensorView,
}

/// A whole value as sent: regions, storages, tensors, ready events, and the value tree.
///
/// It travels packed ([`PackedPayload`]).
///
/// ```
/// use shared_tensor_runtime::payload::{Node, WirePayload};
/// fn describe(msg: &WirePayload) -> String {
///     let (t, s, r) = (msg.tensors.len(), msg.storages.len(), msg.regions.len());
///     format!("{t} tensors over {s} storages in {r} regions")
/// }
/// assert_eq!(describe(&WirePayload::plain(Node::Unit)), "0 tensors over 0 storages in 0 regions");
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct WirePayload {
    /// The regions lent: one per allocator block (or part of one) with storages in it.
    pub regions: Vec<WireRegion>,
    /// The storages: parts of regions, or the receiver's own.
    pub storages: Vec<WireStorage>,
    /// The tensors.
    pub tensors: Vec<WireTensor>,
    /// One event per GPU, recorded after the work that produced the data.
    pub ready: Vec<(GpuId, EventHandle)>,
    /// The value.
    pub root: Node,
}

pub use crate::protocol::wire::PackedPayload;

impl PackedPayload {
    /// Packs a payload. Fails only for a value nested deeper than 256 levels.
    ///
    /// ```
    /// use shared_tensor_runtime::payload::{Node, PackedPayload, WirePayload};
    /// let packed = PackedPayload::pack(&WirePayload::plain(Node::Unit)).unwrap();
    /// assert_eq!(packed.as_bytes().len(), 17); // four empty tables and a unit
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
        WirePayload { regions: Vec::new(), storages: Vec::new(), tensors: Vec::new(), ready: Vec::new(), root }
    }

    /// Checks every descriptor before anything is mapped: each region
    /// ([`StorageDescriptor::check`]), each storage (its region is in the message and it
    /// lies inside it), and each tensor's storage index and view ([`TensorView::check`],
    /// against its storage's size when the storage is a part; a returned storage is this
    /// process's own, whose size is checked when the view is built). The error names the
    /// region, storage or tensor by its index and the field.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::{DType, TensorView};
    /// use shared_tensor_runtime::payload::{Node, WirePayload, WireStorage, WireTensor};
    /// let mut msg = WirePayload::plain(Node::Tensor(0));
    /// msg.storages.push(WireStorage::Returned { lease: 1, part: 0 });
    /// let view = TensorView { dtype: DType::F32, sizes: vec![4].into(), strides: vec![-1].into(), storage_offset: 3, requires_grad: false };
    /// msg.tensors.push(WireTensor { storage: 0, view });
    /// let err = msg.check().unwrap_err();
    /// assert!(err.starts_with("tensor 0: stride -1 of dimension 0 is negative"), "{err}");
    /// ```
    pub fn check(&self) -> std::result::Result<(), String> {
        for (i, r) in self.regions.iter().enumerate() {
            r.storage.check().map_err(|e| format!("region {i}: {e}"))?;
        }
        for (i, s) in self.storages.iter().enumerate() {
            if let WireStorage::Part { region, offset, nbytes } = *s {
                let Some(r) = self.regions.get(region as usize) else {
                    return Err(format!(
                        "storage {i}: region {region} is not in the message ({} regions)",
                        self.regions.len()
                    ));
                };
                if offset.checked_add(nbytes).is_none_or(|end| end > r.storage.nbytes) {
                    return Err(format!(
                        "storage {i}: offset {offset} + nbytes {nbytes} lies outside region {region} ({} bytes)",
                        r.storage.nbytes
                    ));
                }
            }
        }
        for (i, t) in self.tensors.iter().enumerate() {
            let nbytes = match self.storages.get(t.storage as usize) {
                Some(WireStorage::Part { nbytes, .. }) => Some(*nbytes),
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
///
/// The names of its fields and keys are kept one after another in one buffer, so that
/// walking into a part costs a copy of its name, not an allocation (a 290-tensor state
/// dict walks 290 keys on each side of every call).
#[derive(Clone, Default)]
pub(crate) struct Path {
    names: String,
    segs: Vec<Seg>,
}

/// One step of a [`Path`]; a field's or key's name is `names[start..end]`.
#[derive(Clone, Copy)]
enum Seg {
    Field { start: usize, end: usize },
    Index(usize),
    Key { start: usize, end: usize },
}

/// A step to take: what [`Walker::scoped`] is given.
#[derive(Clone, Copy)]
enum Step<'a> {
    Field(&'a str),
    Index(usize),
    Key(&'a str),
}

impl Path {
    fn push(&mut self, step: Step<'_>) {
        let mut name = |text: &str| {
            let start = self.names.len();
            self.names.push_str(text);
            (start, self.names.len())
        };
        let seg = match step {
            Step::Field(text) => {
                let (start, end) = name(text);
                Seg::Field { start, end }
            }
            Step::Key(text) => {
                let (start, end) = name(text);
                Seg::Key { start, end }
            }
            Step::Index(i) => Seg::Index(i),
        };
        self.segs.push(seg);
    }

    fn pop(&mut self) {
        if let Some(Seg::Field { start, .. } | Seg::Key { start, .. }) = self.segs.pop() {
            self.names.truncate(start);
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.segs.is_empty() {
            return f.write_str("the value");
        }
        for (i, seg) in self.segs.iter().enumerate() {
            match *seg {
                Seg::Field { start, end } if i == 0 => f.write_str(&self.names[start..end])?,
                Seg::Field { start, end } => write!(f, ".{}", &self.names[start..end])?,
                Seg::Index(n) => write!(f, "[{n}]")?,
                Seg::Key { start, end } => write!(f, "[{:?}]", &self.names[start..end])?,
            }
        }
        Ok(())
    }
}

/// Something that walks a value and tracks where it is.
trait Walker {
    fn path_mut(&mut self) -> &mut Path;

    fn scoped<T>(&mut self, step: Step<'_>, f: impl FnOnce(&mut Self) -> T) -> T
    where
        Self: Sized,
    {
        self.path_mut().push(step);
        let out = f(self);
        self.path_mut().pop();
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
            path.push(Step::Field(root));
        }
        path
    }
}

/// Where an encoded storage's memory comes from.
#[derive(Clone, Copy)]
enum Source {
    /// This process's memory.
    Own(ipc::OwnStorage),
    /// Part `part` of the imported region the encoder knows as number `import`.
    Imported { import: u32, part: u32 },
}

/// One storage of the value, as the encoder found it.
struct EncodedStorage {
    source: Source,
    hold: ffi::OwnedStorage,
}

/// An imported region that storages of the value lie in: looked up once per region, not
/// once per storage.
struct Import {
    cookie: u64,
    region: lease::ImportedRegion,
}

/// A region of an allocator block the value lends as one (one handle, one lease): the
/// storages of the value that lie in it, in part order.
struct EncodedRegion {
    /// The region: the block's handle, the region's offset in the block and its size.
    descriptor: StorageDescriptor,
    /// The parts' storages: what a lease of the region keeps alive.
    parts: lease::Parts,
    /// For a region of imported storages: its cookie (its parts may go back to their
    /// lender).
    imported: Option<u64>,
    /// Bytes of its parts (not of the gaps between them).
    bytes: u64,
}

/// A storage of the encoded value: a part of region `region`, `offset` bytes in (its
/// index among the region's parts is its rank among them in the value's order).
#[derive(Clone, Copy)]
struct PartOf {
    region: u32,
    offset: u64,
    nbytes: u64,
    /// For a part of an imported region: its index among that region's parts, which is
    /// what the lender's lease knows it by.
    home: u32,
}

/// A ready event of a message: the GPU and the event recorded on it.
type ReadyEvent = (GpuId, EventHandle);

/// How one region of a value goes to a peer.
#[derive(Clone, Copy)]
enum Lent {
    /// Lent under this new lease, as region number `wire` of the message.
    Shared { lease: u64, wire: u32 },
    /// The peer's own region: its parts go back as parts of the peer's lease `lease`.
    Returned { lease: u64 },
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
    regions: Vec<EncodedRegion>,
    parts: Vec<PartOf>,
    tensors: Vec<WireTensor>,
    devices: Vec<GpuId>,
    root: Node,
}

impl fmt::Debug for Encoded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Encoded")
            .field("regions", &self.regions.len())
            .field("storages", &self.parts.len())
            .field("tensors", &self.tensors.len())
            .field("root", &self.root)
            .finish()
    }
}

impl Encoded {
    /// Lends the value to `link`'s peer: records a ready event per GPU on the calling
    /// thread's current stream, and decides per region whether it goes back as the
    /// peer's own or is lent under a new lease (under one lock).
    fn lend_parts(&self, link: &Arc<Link>) -> Result<(Vec<ReadyEvent>, Vec<Lent>)> {
        let mut ready = Vec::new();
        for gpu in &self.devices {
            if let Some(event) = EventHandle::when_ready(gpu.index)? {
                ready.push((*gpu, event));
            }
        }
        // Which imported regions go back to their lender: all asked under one lock.
        let imported = self.regions.iter().filter_map(|r| r.imported);
        let mut origins = lease::origins(imported, link).into_iter();
        let returned: Vec<Option<u64>> = self
            .regions
            .iter()
            .map(|r| match r.imported {
                Some(_) => match origins.next() {
                    Some(Origin::ThisPeer(lease)) => Some(lease),
                    _ => None,
                },
                None => None,
            })
            .collect();
        let lent: Vec<lease::Parts> =
            self.regions.iter().zip(&returned).filter(|(_, r)| r.is_none()).map(|(r, _)| r.parts.clone()).collect();
        let mut leases = link.lend_all(lent.into_iter()).into_iter();
        let mut wire = 0u32;
        let lent = returned
            .into_iter()
            .map(|r| match r {
                Some(lease) => Lent::Returned { lease },
                None => {
                    wire += 1;
                    Lent::Shared { lease: leases.next().expect("one lease per lent region"), wire: wire - 1 }
                }
            })
            .collect();
        Ok((ready, lent))
    }

    /// A message for `link`'s peer, packed straight from this value's tables; also the
    /// bytes of GPU memory it lends.
    pub(crate) fn lend(&self, link: &Arc<Link>) -> Result<(PackedPayload, u64)> {
        let (ready, lent) = self.lend_parts(link)?;
        // The tensors' bytes, not a block region's gaps.
        let shared =
            self.regions.iter().zip(&lent).map(|(r, l)| if let Lent::Shared { .. } = l { r.bytes } else { 0 }).sum();
        let regions = self.regions.iter().zip(&lent).filter_map(|(r, l)| match l {
            Lent::Shared { lease, .. } => Some((&r.descriptor, *lease)),
            Lent::Returned { .. } => None,
        });
        let regions: Vec<(&StorageDescriptor, u64)> = regions.collect();
        let storages = self.parts.iter().map(|p| match lent[p.region as usize] {
            Lent::Shared { wire, .. } => WireStorage::Part { region: wire, offset: p.offset, nbytes: p.nbytes },
            Lent::Returned { lease } => WireStorage::Returned { lease, part: p.home },
        });
        let payload = PackedPayload::packed_by(|out| {
            packed::pack_parts(regions.into_iter(), storages, &self.tensors, &ready, &self.root, out)
        })?;
        Ok((payload, shared))
    }

    /// Number of distinct storages in the value: each travels as its own storage, and the
    /// receiver rebuilds one storage for each.
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
        self.parts.len()
    }

    /// Number of regions the value lends: storages carved from one allocator block share
    /// one region (one IPC handle, one mapping, one lease).
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// # use shared_tensor_runtime::payload::Encoder;
    /// let device = shared_tensor_runtime::cuda::device()?;
    /// // Small tensors allocated together come from one block of the caching allocator.
    /// let small: Vec<tch::Tensor> = (0..8).map(|_| tch::Tensor::ones([4], (tch::Kind::Float, device))).collect();
    /// let encoded = Encoder::encode("result", &small)?;
    /// assert_eq!(encoded.storage_count(), 8);
    /// assert!(encoded.region_count() <= 8);
    /// # Ok(()) }
    /// ```
    pub fn region_count(&self) -> usize {
        self.regions.len()
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
        self.parts.iter().map(|p| p.nbytes).sum()
    }
}

/// Groups a value's storages into the regions it lends: storages of this process that
/// lie in one `cudaMalloc` segment (one handle, one GPU) become the parts of one region over
/// the span they cover (one handle, one mapping, one lease), each keeping its own offset
/// and size in it, so the receiver rebuilds each as a storage of its own; so do the
/// storages of one imported region (which may go back to their lender as one). Every
/// other storage (one of an expandable segment, whose handle names one block's pages) is a
/// region of one part. Regions are in the order of their first storage; parts in the order
/// of the storages.
fn group_blocks(
    storages: Vec<EncodedStorage>,
    blocks: &ipc::BlockHandles,
    imports: &[Import],
) -> (Vec<EncodedRegion>, Vec<PartOf>) {
    #[derive(Clone, Copy, PartialEq, Eq, Hash)]
    enum Group {
        Block(u32, [u8; 16]),
        Import(u32),
    }
    /// A region being formed: its first storage, its span and its part count.
    struct Span {
        first: Source,
        start: i64,
        end: i64,
        parts: u32,
    }
    // Each storage's group (None: a region of its own) and byte range in that group.
    let place = |source: Source| -> (Option<Group>, i64, u64) {
        match source {
            Source::Own(o) => {
                let group = ipc::is_cuda_malloc_handle(blocks.handle(o.handle))
                    .then_some(Group::Block(o.handle, o.device.uuid));
                (group, o.offset, o.nbytes)
            }
            Source::Imported { import, part } => {
                let (offset, nbytes) = imports[import as usize].region.parts[part as usize];
                (Some(Group::Import(import)), i64::try_from(offset).unwrap_or(i64::MAX), nbytes)
            }
        }
    };
    let mut groups: rustc_hash::FxHashMap<Group, u32> = Default::default();
    // Each storage's region and its byte range in its group, placed once.
    let mut placed: Vec<(u32, i64, u64)> = Vec::with_capacity(storages.len());
    let mut spans: Vec<Span> = Vec::new();
    for s in &storages {
        let (group, start, nbytes) = place(s.source);
        let end = start.saturating_add(i64::try_from(nbytes).unwrap_or(i64::MAX));
        match group.and_then(|g| groups.get(&g).copied()) {
            Some(r) => {
                let span = &mut spans[r as usize];
                span.start = span.start.min(start);
                span.end = span.end.max(end);
                span.parts += 1;
                placed.push((r, start, nbytes));
            }
            None => {
                let r = spans.len() as u32;
                spans.push(Span { first: s.source, start, end, parts: 1 });
                if let Some(g) = group {
                    groups.insert(g, r);
                }
                placed.push((r, start, nbytes));
            }
        }
    }
    drop(groups);
    let mut parts = Vec::with_capacity(storages.len());
    let mut holds: Vec<Vec<ffi::OwnedStorage>> = spans.iter().map(|s| Vec::with_capacity(s.parts as usize)).collect();
    let mut bytes = vec![0u64; spans.len()];
    for (s, &(r, start, nbytes)) in storages.into_iter().zip(&placed) {
        let home = match s.source {
            Source::Imported { part, .. } => part,
            Source::Own(_) => 0,
        };
        parts.push(PartOf { region: r, offset: (start - spans[r as usize].start) as u64, nbytes, home });
        bytes[r as usize] += nbytes;
        holds[r as usize].push(s.hold);
    }
    let regions = spans
        .into_iter()
        .zip(holds)
        .zip(bytes)
        .map(|((span, holds), bytes)| {
            let nbytes = (span.end - span.start) as u64;
            let (descriptor, imported) = match span.first {
                Source::Own(o) => (
                    StorageDescriptor {
                        handle: blocks.handle(o.handle).to_vec(),
                        offset: span.start,
                        nbytes,
                        device: o.device,
                        producer: ipc::ProcessId::current(),
                    },
                    None,
                ),
                Source::Imported { import, .. } => {
                    let Import { cookie, region } = &imports[import as usize];
                    let offset = region.descriptor.offset.saturating_add(span.start);
                    (StorageDescriptor { offset, nbytes, ..region.descriptor.clone() }, Some(*cookie))
                }
            };
            EncodedRegion { descriptor, parts: holds.into(), imported, bytes }
        })
        .collect();
    (regions, parts)
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
    /// Storages by (address, size, device): views of one storage share its entry.
    storage_index: rustc_hash::FxHashMap<(u64, u64, i32), u32>,
    blocks: ipc::BlockHandles,
    /// Imported regions the value's storages lie in, and each cookie's entry (`None`: not
    /// an import this process knows, exported as its own).
    imports: Vec<Import>,
    import_index: rustc_hash::FxHashMap<u64, Option<u32>>,
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
            storage_index: Default::default(),
            blocks: ipc::BlockHandles::default(),
            imports: Vec::new(),
            import_index: Default::default(),
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
        let (regions, parts) = group_blocks(self.storages, &self.blocks, &self.imports);
        Encoded { regions, parts, tensors: self.tensors, devices: self.devices, root }
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
        self.scoped(Step::Field(name), f)
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
        self.scoped(Step::Index(i), f)
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
        self.scoped(Step::Key(key), f)
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
        // The path is formatted only for an error (no copy of it per tensor).
        let ins = ipc::inspect(t, &|| self.path.to_string())?;
        crate::device::cuda::require()?;
        let key = (ins.meta.storage_base, ins.meta.storage_nbytes, ins.meta.device_index);
        let storage = match self.storage_index.get(&key) {
            Some(index) => *index,
            None => {
                let (cookie, part) = (ins.meta.import_cookie, ins.meta.import_part);
                let import = if cookie != 0 { self.import(cookie) } else { None };
                // A part the region's record does not list is exported as this process's own.
                let part = u32::try_from(part).ok();
                let source = match (import, part) {
                    (Some(import), Some(part))
                        if (part as usize) < self.imports[import as usize].region.parts.len() =>
                    {
                        Source::Imported { import, part }
                    }
                    _ => Source::Own(self.blocks.describe(&ins)?),
                };
                let gpu = self.device_of(source);
                if !self.devices.iter().any(|g| g.uuid == gpu.uuid) {
                    self.devices.push(GpuId::of_device(ins.meta.device_index.max(0) as u32)?);
                }
                let index = self.storages.len() as u32;
                self.storages.push(EncodedStorage { source, hold: ins.storage });
                self.storage_index.insert(key, index);
                index
            }
        };
        self.tensors.push(WireTensor { storage, view: ins.view });
        Ok(Node::Tensor(self.tensors.len() as u32 - 1))
    }

    /// The encoder's number for the imported region `cookie`, looked up once per region.
    fn import(&mut self, cookie: u64) -> Option<u32> {
        if let Some(known) = self.import_index.get(&cookie) {
            return *known;
        }
        let index = lease::imported_region(cookie).map(|region| {
            self.imports.push(Import { cookie, region });
            self.imports.len() as u32 - 1
        });
        self.import_index.insert(cookie, index);
        index
    }

    /// The GPU a storage of the value is on.
    fn device_of(&self, source: Source) -> GpuId {
        match source {
            Source::Own(o) => o.device,
            Source::Imported { import, .. } => self.imports[import as usize].region.descriptor.device,
        }
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
        let device_of = |t: &WireTensor| self.device_of(self.storages[t.storage as usize].source);
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
    /// A part of a region, to open by IPC on first use.
    Part { region: u32, offset: u64, nbytes: u64 },
    /// This process's own storage, come back.
    Local(ffi::OwnedStorage),
    /// A lease of ours that the peer named but we no longer have.
    Missing(u64),
    /// Opened.
    Open(ffi::OwnedStorage),
}

/// A region of a received message.
enum RegionSlot {
    /// Not opened yet: releases `lease` to the sender when the message goes unopened.
    Remote { descriptor: StorageDescriptor, lease: u64 },
    /// Opened: its storages give the lease back when the last of them goes.
    Opened,
}

/// A message as received: storages that came home are pinned at once (before any later
/// release message could drop them).
pub(crate) struct Received {
    regions: Vec<RegionSlot>,
    slots: Vec<Slot>,
    tensors: Vec<WireTensor>,
    ready: Vec<(GpuId, EventHandle)>,
    root: Node,
    link: Arc<Link>,
}

impl WirePayload {
    /// Pins the storages that are `link`'s own. Must run in message order.
    pub(crate) fn receive(self, link: &Arc<Link>) -> Received {
        // Storages that came home, all found under one lock.
        let returned = self.storages.iter().filter_map(|s| match *s {
            WireStorage::Returned { lease, part } => Some((lease, part)),
            WireStorage::Part { .. } => None,
        });
        let mut home = link.lent_storages(returned).into_iter();
        let slots = self
            .storages
            .into_iter()
            .map(|s| match s {
                WireStorage::Part { region, offset, nbytes } => Slot::Part { region, offset, nbytes },
                WireStorage::Returned { lease, .. } => match home.next().flatten() {
                    Some(storage) => Slot::Local(storage),
                    None => Slot::Missing(lease),
                },
            })
            .collect();
        let regions =
            self.regions.into_iter().map(|r| RegionSlot::Remote { descriptor: r.storage, lease: r.lease }).collect();
        Received { regions, slots, tensors: self.tensors, ready: self.ready, root: self.root, link: link.clone() }
    }
}

impl Drop for Received {
    fn drop(&mut self) {
        // Regions lent to us that we never opened: give the leases back now.
        for region in &self.regions {
            if let RegionSlot::Remote { lease, .. } = region {
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
        self.scoped(Step::Field(name), f)
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
        self.scoped(Step::Index(i), f)
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
        self.scoped(Step::Key(key), f)
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
        // Marked only once every wait is queued: after a failed wait, the next tensor
        // waits again rather than being built before the sender's work is done.
        for (gpu, event) in &self.received.ready {
            event.wait(gpu.local_index()?)?;
        }
        self.waited = true;
        Ok(())
    }

    /// Opens every region the peer lent in this message and builds a storage per part, in
    /// one call (once): regions of one allocator block share one mapping. A region no
    /// storage names is not opened (its lease goes back with the message). On error nothing
    /// is opened, and the leases go back to the peer when the message is dropped.
    fn open_remote(&mut self) -> Result<()> {
        if self.opened_remote {
            return Ok(());
        }
        let received = &mut self.received;
        // Each part's place among its region's parts, and which regions have parts.
        let mut counts = vec![0u64; received.regions.len()];
        let mut wanted: Vec<(usize, ffi::Part)> = Vec::with_capacity(received.slots.len());
        for (i, slot) in received.slots.iter().enumerate() {
            if let Slot::Part { region, offset, nbytes } = *slot {
                let index = counts[region as usize];
                counts[region as usize] += 1;
                wanted.push((i, ffi::Part { region: u64::from(region), offset, nbytes, index }));
            }
        }
        if wanted.is_empty() {
            self.opened_remote = true;
            return Ok(());
        }
        // The regions to open, numbered in the call; cookies one per region.
        let mut call_index = vec![u64::MAX; received.regions.len()];
        let mut opened_regions: Vec<usize> = Vec::new();
        for (r, count) in counts.iter().enumerate() {
            if *count > 0 {
                call_index[r] = opened_regions.len() as u64;
                opened_regions.push(r);
            }
        }
        let first = lease::new_cookies(opened_regions.len());
        let descs: Vec<(&StorageDescriptor, u64)> = opened_regions
            .iter()
            .enumerate()
            .map(|(k, &r)| match &received.regions[r] {
                RegionSlot::Remote { descriptor, .. } => (descriptor, first + k as u64),
                RegionSlot::Opened => unreachable!("regions are opened once, all together"),
            })
            .collect();
        let parts: Vec<ffi::Part> =
            wanted.iter().map(|(_, p)| ffi::Part { region: call_index[p.region as usize], ..*p }).collect();
        let path = &self.path;
        let opened = ipc::open_regions(&descs, &parts, &|k| format!("{path}: region {}", opened_regions[k]))?;
        drop(descs);
        let mut records: Vec<lease::NewImport> = Vec::with_capacity(opened_regions.len());
        for (k, &r) in opened_regions.iter().enumerate() {
            let RegionSlot::Remote { descriptor, lease } =
                std::mem::replace(&mut received.regions[r], RegionSlot::Opened)
            else {
                unreachable!("collected as remote above")
            };
            let cookie = first + k as u64;
            records.push(lease::NewImport {
                cookie,
                lease,
                descriptor,
                parts: lease::PartPlaces::with_capacity(counts[r] as usize),
            });
        }
        for ((slot, part), storage) in wanted.into_iter().zip(opened) {
            records[call_index[part.region as usize] as usize].parts.push((part.offset, part.nbytes));
            received.slots[slot] = Slot::Open(storage);
        }
        lease::register_imports(&received.link, records);
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
            Slot::Local(_) => {
                // Moved, not cloned: one FFI call and allocation fewer per storage.
                let Slot::Local(storage) = std::mem::replace(slot, Slot::Missing(0)) else { unreachable!() };
                storage
            }
            Slot::Part { .. } => unreachable!("remote storages are opened first"),
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

/// Call arguments holding one shared `f32[4]` tensor (16 bytes at offset 0 of a storage
/// on device 0) over the IPC `handle`, lent as lease 1..: sample input for the decoder
/// fuzzer, the property tests and the protocol tests. `root` refers to it as `Tensor(0)`.
#[doc(hidden)]
pub fn one_shared_f32x4(handle: Vec<u8>, producer: crate::device::ipc::ProcessId, root: Node) -> WirePayload {
    use crate::device::ipc::{DType, GpuId, StorageDescriptor, TensorView};
    WirePayload {
        regions: vec![WireRegion {
            storage: StorageDescriptor {
                handle,
                offset: 0,
                nbytes: 16,
                device: GpuId { index: 0, uuid: [1; 16] },
                producer,
            },
            lease: 1,
        }],
        storages: vec![WireStorage::Part { region: 0, offset: 0, nbytes: 16 }],
        tensors: vec![WireTensor {
            storage: 0,
            view: TensorView {
                dtype: DType::F32,
                sizes: vec![4].into(),
                strides: vec![1].into(),
                storage_offset: 0,
                requires_grad: false,
            },
        }],
        ready: vec![],
        root,
    }
}

/// Reads every frame of `bytes` and decodes each as both message kinds, discarding the
/// outcome: the fuzzers' entry point. Any result but a panic is correct.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    let mut cursor = std::io::Cursor::new(bytes);
    let mut buf = Vec::new();
    use crate::protocol::wire::{decode, read_frame, ClientMessage, Request, Response, ServerMessage, MAX_FRAME_BYTES};
    while read_frame(&mut cursor, &mut buf).is_ok() {
        assert!(buf.len() <= MAX_FRAME_BYTES);
        if let Ok(ClientMessage::Request {
            request: Request::Call { args, .. } | Request::Submit { args, .. }, ..
        }) = decode::<ClientMessage>(&buf)
        {
            let _ = args.unpack();
        }
        if let Ok(ServerMessage::Reply { result: Ok(Response::Value { payload, .. }), .. }) =
            decode::<ServerMessage>(&buf)
        {
            let _ = payload.unpack();
        }
    }
    let _ = decode::<ClientMessage>(bytes);
    let _ = PackedPayload::from_bytes(bytes.to_vec()).unpack();
}

/// A contiguous `f32` vector of `n` elements from the start of its storage (test data).
#[cfg(test)]
fn f32_vector(n: i64, requires_grad: bool) -> TensorView {
    let dims = |v: i64| ipc::Dims::from_slice(&[v]);
    TensorView {
        dtype: crate::device::ipc::DType::F32,
        sizes: dims(n),
        strides: dims(1),
        storage_offset: 0,
        requires_grad,
    }
}

/// Frames that carry payloads, corrupted: decoding them never panics.
#[cfg(test)]
mod frames {
    use super::*;
    use crate::protocol::wire::{write_frame, ClientMessage, Request};

    /// A valid request frame to corrupt.
    fn sample_frames() -> Vec<u8> {
        let producer = crate::device::ipc::ProcessId { pid: 1, instance: 2 };
        let args = one_shared_f32x4(
            vec![2, b'c', 9, 9, 9],
            producer,
            Node::Seq(vec![Node::Tensor(0), Node::Data(vec![1, 2])]),
        );
        let args = PackedPayload::pack(&args).unwrap();
        let mut out = Vec::new();
        write_frame(
            &ClientMessage::Request {
                id: 1,
                request: Request::Call { endpoint: "identity".into(), args, deadline_ms: None },
            },
            &mut out,
        )
        .unwrap();
        write_frame(&ClientMessage::Release(vec![1, 2, 3]), &mut out).unwrap();
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            fuzz_decode(&bytes);
        }

        #[test]
        fn corrupted_frames_never_panic(flips in proptest::collection::vec((0usize..4096, proptest::prelude::any::<u8>()), 1..8)) {
            let mut bytes = sample_frames();
            let n = bytes.len();
            for (at, value) in flips {
                bytes[at % n] = value;
            }
            fuzz_decode(&bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_read_like_rust() {
        let mut p = Path::default();
        p.push(Step::Field("encoder"));
        p.push(Step::Field("layers"));
        p.push(Step::Index(3));
        p.push(Step::Field("weight"));
        assert_eq!(p.to_string(), "encoder.layers[3].weight");
        p.scoped(Step::Key("k\"v"), |p: &mut Path| {
            assert_eq!(p.to_string(), "encoder.layers[3].weight[\"k\\\"v\"]");
            p.scoped(Step::Index(0), |p: &mut Path| {
                assert_eq!(p.to_string(), "encoder.layers[3].weight[\"k\\\"v\"][0]")
            });
        });
        // Leaving a step takes its name off again.
        assert_eq!(p.to_string(), "encoder.layers[3].weight");
        p.pop();
        p.pop();
        p.scoped(Step::Key("q"), |p: &mut Path| assert_eq!(p.to_string(), "encoder.layers[\"q\"]"));
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

    /// An encoded storage of `hold` at `offset` of the block named by `handle` (a fake
    /// handle: grouping is arithmetic on descriptors, so CPU storages stand in for CUDA).
    fn own(
        blocks: &mut ipc::BlockHandles,
        handle: &[u8],
        uuid: u8,
        offset: i64,
        nbytes: u64,
        hold: &ffi::OwnedStorage,
    ) -> EncodedStorage {
        let device = GpuId { index: 0, uuid: [uuid; 16] };
        let handle = blocks.intern(handle.to_vec());
        EncodedStorage {
            source: Source::Own(ipc::OwnStorage { handle, offset, nbytes, device }),
            hold: hold.clone_ref(),
        }
    }

    /// An imported region (cookie 9) with parts at the given (offset, nbytes) of a region
    /// that starts 4096 bytes into its block.
    fn import_of(parts: Vec<(u64, u64)>) -> Import {
        use crate::device::ipc::ProcessId;
        let descriptor = StorageDescriptor {
            handle: b"\x02cI".to_vec(),
            offset: 4096,
            nbytes: 1 << 20,
            device: GpuId { index: 1, uuid: [7; 16] },
            producer: ProcessId { pid: 2, instance: 2 },
        };
        Import { cookie: 9, region: lease::ImportedRegion { descriptor, parts: parts.into() } }
    }

    fn cpu_storage(t: &Tensor) -> ffi::OwnedStorage {
        ffi::inspect(t, true).unwrap().storage.unwrap()
    }

    /// Storages of one `cudaMalloc` segment (one handle, one GPU) become the parts of one
    /// region over the span they cover, each keeping its offset and size, and so do the
    /// storages of one imported region (each keeping its index there); the others (another
    /// segment, another GPU, an expandable segment's handle) are regions of their own.
    #[test]
    fn storages_of_one_block_are_parts_of_one_region() {
        let hold = cpu_storage(&Tensor::arange(4, (tch::Kind::Float, tch::Device::Cpu)));
        let imports = vec![import_of(vec![(0, 8), (64, 8), (256, 16), (512, 8)])];
        let imported = |part| EncodedStorage { source: Source::Imported { import: 0, part }, hold: hold.clone_ref() };
        let mut blocks = ipc::BlockHandles::default();
        let storages = vec![
            own(&mut blocks, b"\x02cA", 4, 512, 64, &hold),
            own(&mut blocks, b"\x02cB", 4, 0, 16, &hold),
            own(&mut blocks, b"\x02cA", 4, 128, 32, &hold),
            own(&mut blocks, b"\x02cA", 5, 128, 32, &hold), // same handle bytes, another GPU
            own(&mut blocks, b"\x02eE", 4, 0, 8, &hold),
            own(&mut blocks, b"\x02eE", 4, 8, 8, &hold),
            imported(3),
            own(&mut blocks, b"\x02cA", 4, 800, 8, &hold),
            imported(1),
        ];
        let (regions, parts) = group_blocks(storages, &blocks, &imports);
        let spans: Vec<(i64, u64, usize, u64)> =
            regions.iter().map(|r| (r.descriptor.offset, r.descriptor.nbytes, r.parts.len(), r.bytes)).collect();
        assert_eq!(
            spans,
            vec![
                (128, 808 - 128, 3, 64 + 32 + 8),
                (0, 16, 1, 16),
                (128, 32, 1, 32),
                (0, 8, 1, 8),
                (8, 8, 1, 8),
                (4096 + 64, 512 + 8 - 64, 2, 16)
            ]
        );
        let homes: Vec<u32> = parts.iter().filter(|p| p.region == 5).map(|p| p.home).collect();
        let parts: Vec<(u32, u64, u64)> = parts.iter().map(|p| (p.region, p.offset, p.nbytes)).collect();
        assert_eq!(
            parts,
            vec![
                (0, 512 - 128, 64),
                (1, 0, 16),
                (0, 0, 32),
                (2, 0, 32),
                (3, 0, 8),
                (4, 0, 8),
                (5, 512 - 64, 8),
                (0, 800 - 128, 8),
                (5, 0, 8)
            ]
        );
        assert_eq!(homes, vec![3, 1], "each imported part keeps its index in its lender's region");
        assert_eq!(regions[5].imported, Some(9), "an imported region may go back to its lender");
        assert_eq!(regions[5].descriptor.handle, b"\x02cI", "forwarded: the imported region's handle");
        assert!(regions[..5].iter().all(|r| r.imported.is_none()));
        assert_eq!(regions[0].descriptor.handle, b"\x02cA");
    }

    /// Lending a region gives one lease for all its parts and a table of parts; a part that
    /// comes back names its lease and index and resolves to the very storage it was lent
    /// as (the same StorageImpl), while a part of another region stays apart.
    #[test]
    fn parts_come_home_as_their_own_storages() {
        use crate::device::ipc::DType;
        let cpu = (tch::Kind::Float, tch::Device::Cpu);
        let (a, b, c) = (Tensor::arange(16, cpu), Tensor::arange(8, cpu), Tensor::arange(4, cpu));
        let mut blocks = ipc::BlockHandles::default();
        let storages = vec![
            own(&mut blocks, b"\x02cA", 0, 0, 64, &cpu_storage(&a)),
            own(&mut blocks, b"\x02cA", 0, 512, 32, &cpu_storage(&b)),
            own(&mut blocks, b"\x02cB", 0, 0, 16, &cpu_storage(&c)),
        ];
        let (regions, parts) = group_blocks(storages, &blocks, &[]);
        let view = |sizes: Vec<i64>, storage_offset| TensorView {
            dtype: DType::F32,
            strides: vec![1; sizes.len()].into(),
            sizes: sizes.into(),
            storage_offset,
            requires_grad: false,
        };
        let tensors = vec![
            WireTensor { storage: 0, view: view(vec![16], 0) },
            WireTensor { storage: 1, view: view(vec![2], 6) },
            WireTensor { storage: 2, view: view(vec![4], 0) },
        ];
        let root = Node::Seq(vec![Node::Tensor(0), Node::Tensor(1), Node::Tensor(2)]);
        let encoded = Encoded { regions, parts, tensors: tensors.clone(), devices: Vec::new(), root };
        assert_eq!((encoded.storage_count(), encoded.region_count(), encoded.storage_bytes()), (3, 2, 112));
        let link = Link::new(Box::new(|_, _| {}));
        let (packed, lent_bytes) = encoded.lend(&link).unwrap();
        assert_eq!(lent_bytes, 112);
        assert_eq!(link.live_leases(), 2, "one lease per region");
        let msg = packed.unpack().unwrap();
        assert_eq!(
            msg.regions.iter().map(|r| (r.storage.offset, r.storage.nbytes)).collect::<Vec<_>>(),
            [(0, 544), (0, 16)]
        );
        let (l0, l1) = (msg.regions[0].lease, msg.regions[1].lease);
        assert_eq!(
            msg.storages,
            vec![
                WireStorage::Part { region: 0, offset: 0, nbytes: 64 },
                WireStorage::Part { region: 0, offset: 512, nbytes: 32 },
                WireStorage::Part { region: 1, offset: 0, nbytes: 16 },
            ]
        );
        assert_eq!(msg.tensors, tensors, "views keep their own storage offsets");
        // The peer sends them back: each part by its lease and index.
        let mut back = WirePayload::plain(Node::Seq(vec![Node::Tensor(0), Node::Tensor(1), Node::Tensor(2)]));
        back.storages = vec![
            WireStorage::Returned { lease: l0, part: 1 },
            WireStorage::Returned { lease: l0, part: 0 },
            WireStorage::Returned { lease: l1, part: 0 },
        ];
        back.tensors = vec![
            WireTensor { storage: 0, view: view(vec![2], 6) },
            WireTensor { storage: 1, view: view(vec![16], 0) },
            WireTensor { storage: 2, view: view(vec![4], 0) },
        ];
        let mut dec = Decoder::new(back.receive(&link), "result");
        let got: Vec<Tensor> = (0..3).map(|i| dec.tensor(Node::Tensor(i)).unwrap()).collect();
        assert!(got[0].is_set_to(&b.narrow(0, 6, 2)), "part 1 is b's own StorageImpl");
        assert!(got[1].is_set_to(&a), "part 0 is a's own StorageImpl");
        assert!(got[2].is_set_to(&c));
        // A part the lease does not have is refused, by lease.
        let mut bad = WirePayload::plain(Node::Tensor(0));
        bad.storages = vec![WireStorage::Returned { lease: l1, part: 1 }];
        bad.tensors = vec![WireTensor { storage: 0, view: view(vec![1], 0) }];
        let mut dec = Decoder::new(bad.receive(&link), "result");
        let err = dec.tensor(Node::Tensor(0)).unwrap_err().to_string();
        assert!(err.contains(&format!("storage lease {l1}")), "{err}");
        link.released(&[l0, l1]);
        assert_eq!(link.live_leases(), 0);
    }

    /// A message whose storages cannot be opened (here: no GPU, or a GPU that is not the
    /// descriptor's) builds no tensor, and every lease goes back to the peer exactly once,
    /// whether the decoder tries again or not.
    #[test]
    fn a_message_that_cannot_be_opened_gives_every_lease_back_once() {
        use crate::device::ipc::ProcessId;
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let link = Link::new(Box::new(move |lease, _| sink.lock().push(lease)));
        let region = |lease| WireRegion {
            storage: StorageDescriptor {
                handle: vec![2, b'c', 9, 9],
                offset: 0,
                nbytes: 64,
                device: GpuId { index: 0, uuid: [0xee; 16] },
                producer: ProcessId { pid: 1, instance: 42 },
            },
            lease,
        };
        let view = f32_vector(16, false);
        let mut msg = WirePayload::plain(Node::Seq(vec![Node::Tensor(0), Node::Tensor(1)]));
        // Region 9 is named by no storage: it is never opened, and goes back too.
        msg.regions = vec![region(7), region(8), region(9)];
        msg.storages = vec![
            WireStorage::Part { region: 0, offset: 0, nbytes: 64 },
            WireStorage::Part { region: 1, offset: 0, nbytes: 64 },
        ];
        msg.tensors = vec![WireTensor { storage: 0, view: view.clone() }, WireTensor { storage: 1, view }];
        let msg = PackedPayload::pack(&msg).unwrap().unpack().unwrap();
        let mut dec = Decoder::new(msg.receive(&link), "result");
        assert!(dec.tensor(Node::Tensor(0)).is_err());
        assert!(dec.tensor(Node::Tensor(1)).is_err(), "a second try fails the same way, without a panic");
        assert!(seen.lock().is_empty(), "nothing is released while the message lives");
        drop(dec);
        assert_eq!(*seen.lock(), vec![7, 8, 9]);
    }

    /// A message of `n` CPU tensors lent through `link` and come home (as a reply that
    /// returns the caller's own storages), each viewed as 4 floats; `storages` may be edited.
    fn homecoming(link: &Arc<Link>, n: usize, keep: &mut Vec<Tensor>, edit: impl FnOnce(&mut WirePayload)) -> Received {
        let holds: Vec<ffi::OwnedStorage> = (0..n)
            .map(|i| {
                let t = Tensor::from_slice(&[i as f32; 4]).requires_grad_(i % 2 == 0);
                let s = ffi::inspect(&t, true).unwrap().storage.unwrap();
                keep.push(t);
                s
            })
            .collect();
        let lease = link.lend_all(std::iter::once(holds.into())).pop().unwrap();
        let mut msg = WirePayload::plain(Node::Seq((0..n as u32).map(Node::Tensor).collect()));
        msg.storages = (0..n as u32).map(|part| WireStorage::Returned { lease, part }).collect();
        msg.tensors =
            (0..n as u32).map(|storage| WireTensor { storage, view: f32_vector(4, storage % 2 == 0) }).collect();
        edit(&mut msg);
        PackedPayload::pack(&msg).unwrap().unpack().unwrap().receive(link)
    }

    #[test]
    fn every_tensor_of_a_message_is_built_over_its_own_storage() {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        let mut dec = Decoder::new(homecoming(&link, 5, &mut keep, |_| {}), "args");
        let root = dec.take_root();
        let got: Vec<Tensor> = Payload::decode(root, &mut dec).unwrap();
        assert_eq!(got.len(), 5);
        for (i, (t, original)) in got.iter().zip(&keep).enumerate() {
            assert_eq!(t.data_ptr(), original.data_ptr(), "tensor {i} views its own storage");
            assert_eq!((t.size(), t.requires_grad()), (vec![4], i % 2 == 0), "tensor {i}");
            assert_eq!(t.double_value(&[3]), i as f64);
        }
        // A node naming a tensor again (a hostile frame) gets another view of the storage.
        let again = dec.tensor(Node::Tensor(2)).unwrap();
        assert_eq!(again.data_ptr(), keep[2].data_ptr());
    }

    #[test]
    fn a_tensor_over_a_lease_no_longer_held_is_named_and_the_others_still_decode() {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        let received = homecoming(&link, 4, &mut keep, |msg| {
            msg.storages[2] = WireStorage::Returned { lease: 999, part: 0 };
        });
        let mut dec = Decoder::new(received, "args");
        let err = dec.index(2, |dec| dec.tensor(Node::Tensor(2))).unwrap_err();
        assert!(err.to_string().contains("args[2]: the peer returned storage lease 999"), "{err}");
        for i in [0, 1, 3] {
            assert_eq!(dec.tensor(Node::Tensor(i)).unwrap().data_ptr(), keep[i as usize].data_ptr());
        }
    }

    #[test]
    fn a_view_past_its_storage_is_named_though_the_others_fit() {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        // Packed then unpacked as a peer's would be: a view the sender's check would
        // refuse is made here, after it, as a corrupt sender could.
        let mut received = homecoming(&link, 3, &mut keep, |_| {});
        received.tensors[1].view.storage_offset = 1; // 4 floats from float 1: 20 bytes of 16
        let mut dec = Decoder::new(received, "args");
        let err = dec.index(1, |dec| dec.tensor(Node::Tensor(1))).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("args[1]: the tensor does not fit its storage"), "{message}");
        for i in [0, 2] {
            assert_eq!(dec.tensor(Node::Tensor(i)).unwrap().data_ptr(), keep[i as usize].data_ptr());
        }
    }

    mod hostile_descriptors {
        //! The decoder refuses every descriptor that points outside its storage, naming
        //! the storage or tensor and the field; and accepts exactly the views that fit.
        use super::super::*;
        use crate::device::ipc::{DType, ProcessId, DTYPES};
        use proptest::prelude::*;

        /// A storage entry of a test message: a region lent whole (one part over all of
        /// it), or a returned storage.
        #[derive(Clone)]
        enum Entry {
            Shared(WireRegion),
            Returned(u64),
        }

        fn shared(offset: i64, nbytes: u64) -> Entry {
            Entry::Shared(WireRegion {
                storage: StorageDescriptor {
                    handle: vec![7; 66],
                    offset,
                    nbytes,
                    device: GpuId { index: 0, uuid: [1; 16] },
                    producer: ProcessId { pid: 2, instance: 3 },
                },
                lease: 1,
            })
        }

        fn view(dtype: DType, sizes: Vec<i64>, strides: Vec<i64>, storage_offset: i64) -> TensorView {
            TensorView { dtype, sizes: sizes.into(), strides: strides.into(), storage_offset, requires_grad: false }
        }

        /// A message of `entries` and one tensor over storage 0.
        fn message(entries: Vec<Entry>, view: TensorView) -> WirePayload {
            let mut msg = WirePayload::plain(Node::Tensor(0));
            for entry in entries {
                msg.storages.push(match entry {
                    Entry::Shared(region) => {
                        let nbytes = region.storage.nbytes;
                        msg.regions.push(region);
                        WireStorage::Part { region: msg.regions.len() as u32 - 1, offset: 0, nbytes }
                    }
                    Entry::Returned(lease) => WireStorage::Returned { lease, part: 0 },
                });
            }
            msg.tensors.push(WireTensor { storage: 0, view });
            msg
        }

        /// `entries` and one tensor over storage 0, packed and decoded as a peer's would be.
        fn decode(entries: Vec<Entry>, view: TensorView) -> Result<WirePayload> {
            PackedPayload::pack(&message(entries, view))?.unpack()
        }

        fn refusal(entries: Vec<Entry>, view: TensorView) -> String {
            match decode(entries, view) {
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
            assert_eq!(err, "malformed payload: region 0: offset -4096 is negative");
            let err = refusal(vec![shared(i64::MAX, 16)], ok.clone());
            assert!(err.contains("region 0: offset 9223372036854775807 + nbytes 16 overflows"), "{err}");
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
            if let Entry::Shared(region) = &mut no_handle {
                region.storage.handle.clear();
            }
            let err = refusal(vec![no_handle], ok.clone());
            assert!(err.contains("region 0: nbytes 16 with no IPC handle"), "{err}");
            // A part outside its region, or of a region not in the message.
            let mut msg = message(vec![shared(0, 16)], ok.clone());
            msg.storages[0] = WireStorage::Part { region: 0, offset: 4, nbytes: 16 };
            let err = PackedPayload::pack(&msg).unwrap().unpack().unwrap_err().to_string();
            assert!(err.ends_with("storage 0: offset 4 + nbytes 16 lies outside region 0 (16 bytes)"), "{err}");
            msg.storages[0] = WireStorage::Part { region: 1, offset: 0, nbytes: 16 };
            let err = PackedPayload::pack(&msg).unwrap().unpack().unwrap_err().to_string();
            assert!(err.ends_with("storage 0: region 1 is not in the message (1 regions)"), "{err}");
            // A view is checked against its part, not its region.
            msg.storages[0] = WireStorage::Part { region: 0, offset: 4, nbytes: 12 };
            let err = PackedPayload::pack(&msg).unwrap().unpack().unwrap_err().to_string();
            assert!(err.ends_with("tensor 0: the view (sizes [4], strides [1], 4-byte elements) from storage_offset 0 needs 16 bytes but the storage has 12"), "{err}");
            // A returned storage's size is this process's to know: only the shape is checked.
            let back = vec![Entry::Returned(3)];
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
                        prop_assert!(m.starts_with(&format!("malformed payload: region 0: offset {offset}")), "{}", m);
                    }
                    Err(other) => prop_assert!(false, "{}", other),
                }
            }

            #[test]
            fn parts_are_accepted_exactly_when_inside_their_region(
                region_bytes in prop_oneof![0..4096u64, 0..(i64::MAX as u64)],
                offset in prop_oneof![0..4096u64, any::<u64>()],
                nbytes in prop_oneof![0..4096u64, any::<u64>()],
            ) {
                let mut msg = message(vec![shared(0, region_bytes)], view(DType::U8, vec![0], vec![1], 0));
                msg.storages[0] = WireStorage::Part { region: 0, offset, nbytes };
                let fits = u128::from(offset) + u128::from(nbytes) <= u128::from(region_bytes);
                match PackedPayload::pack(&msg).unwrap().unpack() {
                    Ok(_) => prop_assert!(fits),
                    Err(Error::Protocol(m)) => {
                        prop_assert!(!fits, "{}", m);
                        let tail = format!("storage 0: offset {offset} + nbytes {nbytes} lies outside region 0 ({region_bytes} bytes)");
                        prop_assert!(m.ends_with(&tail), "{}", m);
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

/// CPU micro-benchmarks of the per-tensor work on the receiving side (run by hand:
/// `cargo test -p shared-tensor-runtime --lib --release cpu_costs -- --ignored --nocapture`).
/// Tensors come back as the receiver's own (CPU) storages, so everything but the IPC
/// open runs: unpack, receive, the decoder's walk, one tensor built per entry, and the
/// rebuild of a `HashMap` or a `VarStore`.
#[cfg(test)]
mod cpu_costs {
    use super::*;
    use std::collections::BTreeMap;
    use std::collections::HashMap;
    use std::time::Instant;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("model.layers.{}.self_attn.proj_{}.weight", i / 9, i % 9)).collect()
    }

    pub(super) fn message_for_profile(link: &Arc<Link>, n: usize, keep: &mut Vec<Tensor>) -> PackedPayload {
        message(link, n, keep)
    }

    /// The same tensors as a sequence (what `Vec<Tensor>`, e.g. identity's argument, sends).
    pub(super) fn sequence_for_profile(link: &Arc<Link>, n: usize, keep: &mut Vec<Tensor>) -> PackedPayload {
        let mut msg = message(link, n, keep).unpack().unwrap();
        msg.root = Node::Seq((0..n as u32).map(Node::Tensor).collect());
        PackedPayload::pack(&msg).unwrap()
    }

    /// A message of `n` named tensors, each over a storage lent (here) as part of one region.
    fn message(link: &Arc<Link>, n: usize, keep: &mut Vec<Tensor>) -> PackedPayload {
        let cpu = (tch::Kind::Float, tch::Device::Cpu);
        let holds: Vec<ffi::OwnedStorage> = (0..n)
            .map(|_| {
                let t = Tensor::ones([4], cpu);
                let s = ffi::inspect(&t, true).unwrap().storage.unwrap();
                keep.push(t);
                s
            })
            .collect();
        let lease = link.lend_all(std::iter::once(holds.into())).pop().unwrap();
        let mut msg = WirePayload::plain(Node::Map(
            names(n).into_iter().enumerate().map(|(i, k)| (k, Node::Tensor(i as u32))).collect(),
        ));
        msg.storages = (0..n as u32).map(|part| WireStorage::Returned { lease, part }).collect();
        let view = f32_vector(4, true);
        msg.tensors = (0..n as u32).map(|storage| WireTensor { storage, view: view.clone() }).collect();
        PackedPayload::pack(&msg).unwrap()
    }

    fn p50(mut f: impl FnMut()) -> f64 {
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed().as_secs_f64() * 1e6
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[100]
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn measure_cpu_costs() {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        let n = 290;
        let packed = message(&link, n, &mut keep);
        let unpack = p50(|| drop(packed.unpack().unwrap()));
        let receive = p50(|| drop(packed.unpack().unwrap().receive(&link)));
        let map = p50(|| {
            let mut dec = Decoder::new(packed.unpack().unwrap().receive(&link), "result");
            let root = dec.take_root();
            let m: HashMap<String, Tensor> = Payload::decode(root, &mut dec).unwrap();
            drop(m);
        });
        let btree = p50(|| {
            let mut dec = Decoder::new(packed.unpack().unwrap().receive(&link), "result");
            let root = dec.take_root();
            let m: BTreeMap<String, Tensor> = Payload::decode(root, &mut dec).unwrap();
            drop(m);
        });
        let named: Vec<(String, Tensor)> =
            names(n).into_iter().zip(&keep).map(|(k, t)| (k, t.shallow_clone())).collect();
        let trainable: Vec<(String, usize)> = names(n).into_iter().map(|k| (k, 0)).collect();
        let store = p50(|| {
            let named: BTreeMap<String, Tensor> = named.iter().map(|(k, t)| (k.clone(), t.shallow_clone())).collect();
            drop(nn::build_store_for_bench(tch::Device::Cpu, named, &trainable));
        });
        let views = p50(|| {
            for t in &keep {
                drop(t.shallow_clone());
            }
        });
        let holds: Vec<ffi::OwnedStorage> =
            keep.iter().map(|t| ffi::inspect(t, true).unwrap().storage.unwrap()).collect();
        let view = f32_vector(4, true);
        let build = p50(|| {
            for h in &holds {
                drop(ipc::view_tensor(h, &view).unwrap());
            }
        });
        let no_grad = TensorView { requires_grad: false, ..view.clone() };
        let build_no_grad = p50(|| {
            for h in &holds {
                drop(ipc::view_tensor(h, &no_grad).unwrap());
            }
        });
        let clone_refs = p50(|| {
            for h in &holds {
                drop(h.clone_ref());
            }
        });
        let inspect = p50(|| {
            for t in &keep {
                drop(ffi::inspect(t, true).unwrap());
            }
        });
        let lookups = p50(|| drop(link.lent_storages((0..n as u32).map(|part| (1, part)))));
        let mut keep_seq = Vec::new();
        let sequence = sequence_for_profile(&link, n, &mut keep_seq);
        let vec = p50(|| {
            let mut dec = Decoder::new(sequence.unpack().unwrap().receive(&link), "args");
            let root = dec.take_root();
            let v: Vec<Tensor> = Payload::decode(root, &mut dec).unwrap();
            drop(v);
        });
        println!(
            "{n} tensors, p50 µs: build (requires_grad) {build:.1}, build {build_no_grad:.1}, clone_ref {clone_refs:.1}, \
             inspect {inspect:.1}, lent_storages {lookups:.1}"
        );
        println!(
            "{n} tensors, p50 µs: unpack {unpack:.1}, unpack+receive {receive:.1}, decode HashMap {map:.1}, \
             decode BTreeMap {btree:.1}, build_store {store:.1} (shallow_clone x{n}: {views:.1}), \
             decode Vec {vec:.1}"
        );
    }
}

#[cfg(test)]
mod cpu_profile {
    //! One phase at a time, for callgrind (`valgrind --tool=callgrind <test binary>
    //! --ignored --exact payload::cpu_profile::<name>`).
    use super::*;
    use std::collections::BTreeMap;
    use std::collections::HashMap;

    fn setup(n: usize) -> (Arc<Link>, Vec<Tensor>, PackedPayload) {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        let packed = super::cpu_costs::message_for_profile(&link, n, &mut keep);
        (link, keep, packed)
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn measure_decode_map_x50() {
        let (link, _keep, packed) = setup(290);
        for _ in 0..50 {
            let mut dec = Decoder::new(packed.unpack().unwrap().receive(&link), "result");
            let root = dec.take_root();
            let m: HashMap<String, Tensor> = Payload::decode(root, &mut dec).unwrap();
            drop(m);
        }
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn measure_decode_vec_x200() {
        let link = Link::new(Box::new(|_, _| {}));
        let mut keep = Vec::new();
        let packed = super::cpu_costs::sequence_for_profile(&link, 256, &mut keep);
        for _ in 0..200 {
            let mut dec = Decoder::new(packed.unpack().unwrap().receive(&link), "args");
            let root = dec.take_root();
            let v: Vec<Tensor> = Payload::decode(root, &mut dec).unwrap();
            drop(v);
        }
    }

    #[test]
    #[ignore = "a measurement, run by hand"]
    fn measure_decode_store_x50() {
        let (link, _keep, packed) = setup(290);
        for _ in 0..50 {
            let mut dec = Decoder::new(packed.unpack().unwrap().receive(&link), "result");
            let root = dec.take_root();
            let m: BTreeMap<String, Tensor> = Payload::decode(root, &mut dec).unwrap();
            let trainable: Vec<(String, usize)> = m.keys().map(|k| (k.clone(), 0)).collect();
            drop(nn::build_store_for_bench(tch::Device::Cpu, m, &trainable));
        }
    }
}
