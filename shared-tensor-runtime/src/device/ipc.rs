//! The CUDA IPC codec: a CUDA tensor becomes a [`TensorDescriptor`] that another process
//! on the same host turns back into a tensor over the very same GPU memory.
//!
//! A descriptor has three parts:
//! - the **storage**: the IPC handle of the caching-allocator block that holds the
//!   tensor's storage, the storage's byte offset in that block, its size, the GPU (index
//!   and UUID) and the producing process;
//! - the **view**: dtype, sizes, strides, storage offset and `requires_grad`;
//! - the **ready event**: an interprocess CUDA event recorded on the producer's stream
//!   after the work that produced the data; the consumer's stream waits on it, so no
//!   host synchronisation is needed on either side.
//!
//! Lifetimes: the producer must keep the storage alive (hold the [`ExportedTensor`])
//! until every consumer has dropped its tensors; the consumer's tensor owns the mapping,
//! which closes when its last tensor over that storage is dropped. The endpoint layer
//! automates this with leases; this module is the raw mechanism.
//!
//! ```no_run
//! use shared_tensor_runtime::ipc;
//! use tch::{Device, Kind, Tensor};
//!
//! // Process A
//! let t = Tensor::ones([4], (Kind::Float, Device::Cuda(0)));
//! let exported = ipc::export(&t).unwrap();
//! let bytes = rmp_serde::to_vec(exported.descriptor()).unwrap();
//! // ... send `bytes` to process B, keep `exported` alive while B uses the tensor ...
//!
//! // Process B
//! let descriptor: ipc::TensorDescriptor = rmp_serde::from_slice(&bytes).unwrap();
//! let view = ipc::import(&descriptor).unwrap(); // the same GPU memory as `t`
//! ```

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::device::cuda;
use crate::device::ffi;
use crate::error::{Error, Result};
pub use crate::info::ProcessId;

/// Element types that can cross, with c10's `ScalarType` numbering underneath.
///
/// ```
/// use shared_tensor_runtime::ipc::DType;
/// assert_eq!(DType::from_kind(tch::Kind::BFloat16), Some(DType::BF16));
/// assert_eq!(DType::BF16.kind(), tch::Kind::BFloat16);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum DType {
    U8,
    I8,
    I16,
    I32,
    I64,
    F16,
    F32,
    F64,
    ComplexF16,
    ComplexF32,
    ComplexF64,
    Bool,
    BF16,
    F8E5M2,
    F8E4M3Fn,
    F8E5M2Fnuz,
    F8E4M3Fnuz,
}

/// (DType, tch Kind, c10 ScalarType number).
pub(crate) const DTYPES: [(DType, Kind, i32); 17] = [
    (DType::U8, Kind::Uint8, 0),
    (DType::I8, Kind::Int8, 1),
    (DType::I16, Kind::Int16, 2),
    (DType::I32, Kind::Int, 3),
    (DType::I64, Kind::Int64, 4),
    (DType::F16, Kind::Half, 5),
    (DType::F32, Kind::Float, 6),
    (DType::F64, Kind::Double, 7),
    (DType::ComplexF16, Kind::ComplexHalf, 8),
    (DType::ComplexF32, Kind::ComplexFloat, 9),
    (DType::ComplexF64, Kind::ComplexDouble, 10),
    (DType::Bool, Kind::Bool, 11),
    (DType::BF16, Kind::BFloat16, 15),
    (DType::F8E5M2, Kind::Float8e5m2, 23),
    (DType::F8E4M3Fn, Kind::Float8e4m3fn, 24),
    (DType::F8E5M2Fnuz, Kind::Float8e5m2fnuz, 25),
    (DType::F8E4M3Fnuz, Kind::Float8e4m3fnuz, 26),
];

impl DType {
    /// The dtype of a tch `Kind`; `None` for quantized kinds, which cannot be shared.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::DType;
    /// assert_eq!(DType::from_kind(tch::Kind::Float), Some(DType::F32));
    /// assert_eq!(DType::from_kind(tch::Kind::QInt8), None);
    /// ```
    pub fn from_kind(kind: Kind) -> Option<DType> {
        DTYPES.iter().find(|(_, k, _)| *k == kind).map(|(d, _, _)| *d)
    }

    /// The tch `Kind` of this dtype.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::DType;
    /// assert_eq!(DType::F16.kind(), tch::Kind::Half);
    /// ```
    pub fn kind(self) -> Kind {
        DTYPES.iter().find(|(d, _, _)| *d == self).map(|(_, k, _)| *k).unwrap_or(Kind::Uint8)
    }

    pub(crate) fn scalar_type(self) -> i32 {
        DTYPES.iter().find(|(d, _, _)| *d == self).map(|(_, _, s)| *s).unwrap_or(0)
    }

    pub(crate) fn from_scalar_type(st: i32) -> Option<DType> {
        DTYPES.iter().find(|(_, _, s)| *s == st).map(|(d, _, _)| *d)
    }

    /// Bytes of one element.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::DType;
    /// assert_eq!((DType::BF16.itemsize(), DType::ComplexF64.itemsize(), DType::Bool.itemsize()), (2, 16, 1));
    /// ```
    pub fn itemsize(self) -> u64 {
        match self {
            DType::U8 | DType::I8 | DType::Bool => 1,
            DType::F8E5M2 | DType::F8E4M3Fn | DType::F8E5M2Fnuz | DType::F8E4M3Fnuz => 1,
            DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 | DType::ComplexF16 => 4,
            DType::I64 | DType::F64 | DType::ComplexF32 => 8,
            DType::ComplexF64 => 16,
        }
    }
}

/// A GPU: its index in the producer's numbering and its UUID, which is the same in every
/// process whatever `CUDA_VISIBLE_DEVICES` says.
///
/// ```
/// use shared_tensor_runtime::ipc::GpuId;
/// let gpu = GpuId { index: 0, uuid: [7; 16] };
/// assert_eq!(gpu.uuid_string().len(), 36);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuId {
    /// Device index in the producing process.
    pub index: u32,
    /// The GPU's UUID (MessagePack binary on the wire).
    #[serde(with = "serde_bytes")]
    pub uuid: [u8; 16],
}

impl GpuId {
    /// The UUID in the usual 8-4-4-4-12 hex form (as `nvidia-smi -L` prints it, without "GPU-").
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::GpuId;
    /// let gpu = GpuId { index: 0, uuid: [0xab; 16] };
    /// assert_eq!(gpu.uuid_string(), "abababab-abab-abab-abab-abababababab");
    /// ```
    pub fn uuid_string(&self) -> String {
        let h: Vec<String> = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!(
            "{}-{}-{}-{}-{}",
            h[0..4].concat(),
            h[4..6].concat(),
            h[6..8].concat(),
            h[8..10].concat(),
            h[10..16].concat()
        )
    }

    pub(crate) fn of_device(index: u32) -> Result<GpuId> {
        Ok(GpuId { index, uuid: cuda::device_uuid(index)? })
    }

    /// This process's index for the GPU, matched by UUID.
    pub(crate) fn local_index(&self) -> Result<u32> {
        if (self.index as usize) < cuda::require()? && cuda::device_uuid(self.index)? == self.uuid {
            return Ok(self.index);
        }
        cuda::device_by_uuid(&self.uuid)?
            .ok_or_else(|| Error::DeviceNotVisible { index: self.index, uuid: self.uuid_string() })
    }
}

/// Where a storage's memory is and who owns it.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let exported = shared_tensor_runtime::ipc::export(&Tensor::ones([4], (Kind::Float, Device::Cuda(0))))?;
/// let storage = &exported.descriptor().storage;
/// println!("{} bytes on GPU {}, lent by pid {}", storage.nbytes, storage.device.uuid_string(), storage.producer.pid);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageDescriptor {
    /// The CUDA IPC handle of the caching-allocator block (empty for an empty storage).
    #[serde(with = "serde_bytes")]
    pub handle: Vec<u8>,
    /// Byte offset of the storage in the block.
    pub offset: i64,
    /// Size of the storage in bytes.
    pub nbytes: u64,
    /// The GPU holding it.
    pub device: GpuId,
    /// The process that exported it (the only one that cannot open `handle`).
    pub producer: ProcessId,
}

pub use crate::device::ffi::Dims;

/// How a tensor looks at its storage.
///
/// ```
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use tch::{Device, Kind, Tensor};
/// let t = Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)).transpose(0, 1);
/// let view = shared_tensor_runtime::ipc::view_of(&t)?;
/// assert_eq!((view.sizes.as_slice(), view.strides.as_slice()), (&[3, 2][..], &[1, 3][..]));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorView {
    /// Element type.
    pub dtype: DType,
    /// Sizes, one per dimension.
    pub sizes: Dims,
    /// Strides in elements, one per dimension.
    pub strides: Dims,
    /// Offset of the first element in the storage, in elements.
    pub storage_offset: i64,
    /// Whether the tensor requires grad.
    pub requires_grad: bool,
}

impl StorageDescriptor {
    /// Checks what can be checked without the GPU: the offset is not negative, `offset +
    /// nbytes` is a 64-bit count, and a storage with bytes has a handle. The error names
    /// the field and the numbers. Whether `offset + nbytes` lies inside the producer's
    /// allocation is checked when the handle is mapped (the driver knows its size).
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::{GpuId, ProcessId, StorageDescriptor};
    /// let mut storage = StorageDescriptor {
    ///     handle: vec![1; 66],
    ///     offset: 512,
    ///     nbytes: 4096,
    ///     device: GpuId { index: 0, uuid: [0; 16] },
    ///     producer: ProcessId { pid: 1, instance: 2 },
    /// };
    /// assert!(storage.check().is_ok());
    /// storage.offset = -8;
    /// assert_eq!(storage.check().unwrap_err(), "offset -8 is negative");
    /// ```
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.offset < 0 {
            return Err(format!("offset {} is negative", self.offset));
        }
        if (self.offset as u64).checked_add(self.nbytes).is_none_or(|end| end > i64::MAX as u64) {
            return Err(format!("offset {} + nbytes {} overflows a 64-bit address", self.offset, self.nbytes));
        }
        if self.handle.is_empty() && self.nbytes > 0 {
            return Err(format!("nbytes {} with no IPC handle (only an empty storage has none)", self.nbytes));
        }
        Ok(())
    }
}

impl TensorView {
    /// Checks the view against a storage of `storage_nbytes` bytes (`None`: not known
    /// yet, only the shape is checked): sizes, strides and the storage offset are not
    /// negative, there are as many strides as sizes, and a view with elements ends inside
    /// the storage, computed without overflow. The rule is ATen's: a view without
    /// elements fits any storage; otherwise its last element, at `storage_offset +
    /// sum((size_i - 1) * stride_i)`, must end within the storage.
    ///
    /// ```
    /// use shared_tensor_runtime::ipc::{DType, TensorView};
    /// let view = TensorView { dtype: DType::F32, sizes: vec![4, 4].into(), strides: vec![4, 1].into(), storage_offset: 0, requires_grad: false };
    /// assert!(view.check(Some(64)).is_ok());
    /// let past_the_end = TensorView { storage_offset: 1, ..view };
    /// let err = past_the_end.check(Some(64)).unwrap_err();
    /// assert!(err.contains("needs 68 bytes but the storage has 64"), "{err}");
    /// ```
    pub fn check(&self, storage_nbytes: Option<u64>) -> std::result::Result<(), String> {
        if self.sizes.len() != self.strides.len() {
            return Err(format!("{} sizes but {} strides", self.sizes.len(), self.strides.len()));
        }
        if let Some((dim, size)) = self.sizes.iter().enumerate().find(|(_, s)| **s < 0) {
            return Err(format!("size {size} of dimension {dim} is negative (sizes {:?})", self.sizes));
        }
        if let Some((dim, stride)) = self.strides.iter().enumerate().find(|(_, s)| **s < 0) {
            return Err(format!(
                "stride {stride} of dimension {dim} is negative (strides {:?}); negative strides are not supported",
                self.strides
            ));
        }
        if self.storage_offset < 0 {
            return Err(format!("storage_offset {} is negative", self.storage_offset));
        }
        let Some(nbytes) = storage_nbytes else { return Ok(()) };
        if self.sizes.contains(&0) {
            return Ok(());
        }
        let describe = || {
            format!(
                "the view (sizes {:?}, strides {:?}, {}-byte elements) from storage_offset {}",
                self.sizes,
                self.strides,
                self.dtype.itemsize(),
                self.storage_offset
            )
        };
        // One past the last element, in elements, then in bytes.
        let mut end = self.storage_offset.checked_add(1);
        for (size, stride) in self.sizes.iter().zip(&self.strides) {
            end = end.and_then(|e| (size - 1).checked_mul(*stride)?.checked_add(e));
        }
        let need = end.and_then(|end| (end as u64).checked_mul(self.dtype.itemsize()));
        match need {
            None => Err(format!("{} needs more bytes than a 64-bit count holds", describe())),
            Some(need) if need > nbytes => {
                Err(format!("{} needs {need} bytes but the storage has {nbytes}", describe()))
            }
            Some(_) => Ok(()),
        }
    }
}

/// An interprocess CUDA event handle (`cudaIpcEventHandle_t`).
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// let t = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0))) * 2;
/// let exported = shared_tensor_runtime::ipc::export(&t)?;
/// if let Some(event) = &exported.descriptor().ready {
///     println!("the consumer's stream will wait on {event:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHandle(pub serde_bytes::ByteArray<64>);

impl EventHandle {
    /// The event a consumer must wait for, or `None` when the calling thread's current
    /// stream on `device` has no work queued: then everything it produced is complete and
    /// the consumer may use the memory at once. Interprocess events are cheap to record
    /// but slow to resolve across processes, so the hot path avoids them when it can.
    pub(crate) fn when_ready(device: u32) -> Result<Option<EventHandle>> {
        if ffi::stream_idle(device as i32).map_err(|m| Error::cuda("querying the stream", m))? {
            return Ok(None);
        }
        EventHandle::record(device).map(Some)
    }

    /// Records the calling thread's current stream on `device` and returns the event.
    pub(crate) fn record(device: u32) -> Result<EventHandle> {
        let raw = ffi::event_record(device as i32).map_err(|m| Error::cuda("recording the ready event", m))?;
        Ok(EventHandle(serde_bytes::ByteArray::new(raw)))
    }

    /// Makes the calling thread's current stream on `device` wait for the event.
    pub(crate) fn wait(&self, device: u32) -> Result<()> {
        ffi::event_wait(device as i32, &self.0).map_err(|m| Error::cuda("waiting for the ready event", m))
    }
}

/// Everything another process needs to rebuild a tensor over the same GPU memory.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// use shared_tensor_runtime::ipc::{self, TensorDescriptor};
/// let exported = ipc::export(&tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0))))?;
/// let bytes = rmp_serde::to_vec(exported.descriptor()).unwrap(); // sent to the other process
/// let descriptor: TensorDescriptor = rmp_serde::from_slice(&bytes).unwrap();
/// assert_eq!(descriptor.view.sizes.as_slice(), &[4]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorDescriptor {
    /// The storage.
    pub storage: StorageDescriptor,
    /// The view over it.
    pub view: TensorView,
    /// Event the consumer waits on before using the data (`None`: the producer's stream
    /// was idle, the data is complete).
    pub ready: Option<EventHandle>,
}

/// Keeps an exported storage's memory alive. While it lives, the block cannot be freed
/// or reused by the producer, so consumers' views stay valid.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// let t = tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cuda(0)));
/// let (descriptor, hold) = shared_tensor_runtime::ipc::export(&t)?.into_parts();
/// drop(t); // the memory stays allocated: `hold` keeps it
/// // ... send `descriptor`, wait until the consumer has dropped its tensors ...
/// drop(hold);
/// # let _ = descriptor;
/// # Ok(()) }
/// ```
pub struct StorageHold {
    _storage: ffi::OwnedStorage,
}

impl std::fmt::Debug for StorageHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageHold")
    }
}

/// A tensor exported for another process: its descriptor, and the hold that keeps its
/// memory alive in this one.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// let t = tch::Tensor::randn([16], (tch::Kind::Float, tch::Device::Cuda(0)));
/// let exported = shared_tensor_runtime::ipc::export(&t)?;
/// println!("{:?}", exported.descriptor().view);
/// // keep `exported` alive while the other process uses the tensor
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ExportedTensor {
    descriptor: TensorDescriptor,
    hold: StorageHold,
}

impl ExportedTensor {
    /// The descriptor to send.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let t = tch::Tensor::ones([2], (tch::Kind::Int, tch::Device::Cuda(0)));
    /// let exported = shared_tensor_runtime::ipc::export(&t)?;
    /// let bytes = rmp_serde::to_vec(exported.descriptor()).unwrap();
    /// println!("a {}-byte descriptor", bytes.len());
    /// # Ok(()) }
    /// ```
    pub fn descriptor(&self) -> &TensorDescriptor {
        &self.descriptor
    }

    /// Splits into the descriptor and the hold.
    ///
    /// ```no_run
    /// # fn main() -> shared_tensor_runtime::Result<()> {
    /// let t = tch::Tensor::ones([2], (tch::Kind::Int, tch::Device::Cuda(0)));
    /// let exported = shared_tensor_runtime::ipc::export(&t)?;
    /// let (descriptor, hold) = exported.into_parts();
    /// let bytes = rmp_serde::to_vec(&descriptor).unwrap(); // send it; keep `hold` until the consumer is done
    /// # drop((bytes, hold));
    /// # Ok(()) }
    /// ```
    pub fn into_parts(self) -> (TensorDescriptor, StorageHold) {
        (self.descriptor, self.hold)
    }

    pub(crate) fn from_parts(descriptor: TensorDescriptor, hold: StorageHold) -> ExportedTensor {
        ExportedTensor { descriptor, hold }
    }
}

/// A CUDA tensor's metadata and an owning reference to its storage, checked for sharing.
pub(crate) struct Inspected {
    pub meta: ffi::TensorMeta,
    pub view: TensorView,
    pub storage: ffi::OwnedStorage,
}

/// Reads a tensor and checks it can travel: defined, on CUDA, a shareable dtype.
/// `path` names the tensor in error messages.
pub(crate) fn inspect(t: &Tensor, path: &dyn Fn() -> String) -> Result<Inspected> {
    let ins = ffi::inspect(t, true).map_err(|m| Error::Unsupported { path: path(), reason: m })?;
    if ins.meta.defined == 0 {
        return Err(Error::Unsupported { path: path(), reason: "the tensor is undefined".into() });
    }
    if ins.meta.device_type != ffi::DEVICE_TYPE_CUDA {
        return Err(Error::NotCuda { path: path(), device: format!("{:?}", t.device()) });
    }
    let (view, (meta, storage)) = view_from(t, ins, path)?;
    let storage = storage.ok_or_else(|| Error::Unsupported { path: path(), reason: "it has no storage".into() })?;
    Ok(Inspected { meta, view, storage })
}

/// How a tensor looks at its storage: dtype, sizes, strides, storage offset and
/// `requires_grad` (tch has no getter for the storage offset).
///
/// ```
/// use tch::{Device, Kind, Tensor};
/// let base = Tensor::zeros([10], (Kind::Float, Device::Cpu));
/// let view = shared_tensor_runtime::ipc::view_of(&base.narrow(0, 3, 4)).unwrap();
/// assert_eq!((view.storage_offset, view.sizes.as_slice()), (3, &[4][..]));
/// ```
pub fn view_of(t: &Tensor) -> Result<TensorView> {
    let ins = ffi::inspect(t, false).map_err(|m| Error::Unsupported { path: "tensor".into(), reason: m })?;
    view_from(t, ins, &|| "tensor".to_string()).map(|(view, _)| view)
}

/// The view part of `ffi::inspect`'s report, with the dtype checked; hands back the
/// remaining metadata and storage.
fn view_from(
    t: &Tensor,
    ins: ffi::Inspected,
    path: &dyn Fn() -> String,
) -> Result<(TensorView, (ffi::TensorMeta, Option<ffi::OwnedStorage>))> {
    let dtype = DType::from_scalar_type(ins.meta.scalar_type).ok_or_else(|| Error::Unsupported {
        path: path(),
        reason: format!("its dtype {:?} (quantized or unknown) has no IPC form", t.kind()),
    })?;
    let view = TensorView {
        dtype,
        sizes: ins.sizes,
        strides: ins.strides,
        storage_offset: ins.meta.storage_offset,
        requires_grad: ins.meta.requires_grad != 0,
    };
    Ok((view, (ins.meta, ins.storage)))
}

/// The descriptor of an inspected tensor's storage.
pub(crate) fn describe_storage(ins: &Inspected) -> Result<StorageDescriptor> {
    let device = ins.meta.device_index.max(0) as u32;
    let (handle, offset) = ffi::export_storage(&ins.storage).map_err(|m| Error::cuda("exporting an IPC handle", m))?;
    Ok(StorageDescriptor {
        handle,
        offset,
        nbytes: ins.meta.storage_nbytes,
        device: GpuId::of_device(device)?,
        producer: ProcessId::current(),
    })
}

/// Whether c10 made `handle` for a `cudaMalloc` segment: `[version, b'c', cudaIpcMemHandle_t]`,
/// one handle for the whole segment, with storage offsets counted from its start.
pub(crate) fn is_cuda_malloc_handle(handle: &[u8]) -> bool {
    handle.get(1) == Some(&b'c')
}

/// Where an inspected storage of this process lies: `offset` bytes into the allocation
/// whose IPC handle is [`BlockHandles::handle`] `handle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnStorage {
    pub handle: u32,
    pub offset: i64,
    pub nbytes: u64,
    pub device: GpuId,
}

/// The IPC handles a sender has exported while encoding one value, by allocation: storages
/// of one `cudaMalloc` segment share its handle, so each segment's handle is fetched once
/// (`cudaIpcGetMemHandle` costs about a microsecond) and stored once (storages name it by
/// number), and the driver is asked which allocation holds a storage only when no known
/// one does. Valid while the storages it saw are held: a segment with an allocated block
/// is never freed, so its range cannot be reused by another.
#[derive(Default)]
pub(crate) struct BlockHandles {
    /// By device: its known segments.
    known: Vec<(i32, Segments)>,
    /// The distinct handles seen, in order; storages name them by index.
    handles: Vec<Vec<u8>>,
    /// Index of each distinct handle (only consulted when a storage is exported).
    by_bytes: rustc_hash::FxHashMap<Vec<u8>, u32>,
}

/// Segments by start address: each one's size and handle index.
type Segments = std::collections::BTreeMap<u64, (u64, u32)>;

impl BlockHandles {
    /// The known segment of `device` holding `address`: its start and handle index.
    fn find(&self, device: i32, address: u64) -> Option<(u64, u32)> {
        let (_, segments) = self.known.iter().find(|(d, _)| *d == device)?;
        let (start, (size, handle)) = segments.range(..=address).next_back()?;
        (address - start < *size).then_some((*start, *handle))
    }

    /// The bytes of handle `index`.
    pub(crate) fn handle(&self, index: u32) -> &[u8] {
        &self.handles[index as usize]
    }

    /// Where an inspected tensor's storage lies, reusing its allocation's handle.
    pub(crate) fn describe(&mut self, ins: &Inspected) -> Result<OwnStorage> {
        let device = ins.meta.device_index;
        let address = ins.meta.storage_base;
        let nbytes = ins.meta.storage_nbytes;
        if address != 0 {
            if let Some((start, handle)) = self.find(device, address) {
                let gpu = GpuId::of_device(device.max(0) as u32)?;
                return Ok(OwnStorage { handle, offset: (address - start) as i64, nbytes, device: gpu });
            }
        }
        let described = describe_storage(ins)?;
        let handle = self.intern(described.handle);
        let own = OwnStorage { handle, offset: described.offset, nbytes, device: described.device };
        if address == 0 {
            return Ok(own);
        }
        let Ok((start, size)) = ffi::storage_allocation(&ins.storage) else { return Ok(own) };
        // Only a cudaMalloc segment's handle names the whole allocation, with offsets from
        // its start (an expandable segment's names the pages of one block).
        if is_cuda_malloc_handle(self.handle(handle))
            && size > 0
            && own.offset >= 0
            && address.checked_sub(own.offset as u64) == Some(start)
        {
            let segments = match self.known.iter().position(|(d, _)| *d == device) {
                Some(i) => &mut self.known[i].1,
                None => {
                    self.known.push((device, Default::default()));
                    &mut self.known.last_mut().expect("just pushed").1
                }
            };
            segments.insert(start, (size, handle));
        }
        Ok(own)
    }

    /// The index of `handle`, added if new.
    pub(crate) fn intern(&mut self, handle: Vec<u8>) -> u32 {
        if let Some(index) = self.by_bytes.get(&handle) {
            return *index;
        }
        let index = self.handles.len() as u32;
        self.handles.push(handle.clone());
        self.by_bytes.insert(handle, index);
        index
    }
}

/// Exports a CUDA tensor for another process on this host.
///
/// Fails with [`Error::NotCuda`] for a tensor that is not on a CUDA device (nothing is
/// copied), and [`Error::Unsupported`] for quantized, sparse or undefined tensors.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// let t = tch::Tensor::randn([8, 8], (tch::Kind::Float, tch::Device::Cuda(0)));
/// let exported = shared_tensor_runtime::ipc::export(&t)?;
/// assert_eq!(exported.descriptor().view.sizes.as_slice(), &[8, 8]);
/// # Ok(()) }
/// ```
pub fn export(t: &Tensor) -> Result<ExportedTensor> {
    let ins = inspect(t, &|| "tensor".to_string())?;
    cuda::require()?;
    let storage = describe_storage(&ins)?;
    let ready = EventHandle::when_ready(storage.device.index)?;
    Ok(ExportedTensor {
        descriptor: TensorDescriptor { storage, view: ins.view, ready },
        hold: StorageHold { _storage: ins.storage },
    })
}

/// Opens a storage exported by another process. `cookie`, when non-zero, is passed to
/// the release hook when the storage's last reference goes.
pub(crate) fn open_storage(desc: &StorageDescriptor, cookie: u64) -> Result<(ffi::OwnedStorage, u32)> {
    let device = desc.device.local_index()?;
    let whole = ffi::Part { region: 0, offset: 0, nbytes: desc.nbytes, index: 0 };
    let mut opened = open_regions(&[(desc, cookie)], &[whole], &|_| "descriptor.storage".to_string())?;
    Ok((opened.pop().expect("one storage per part"), device))
}

/// Opens regions exported by other processes and builds one storage per part of them, in
/// one call into C++: regions of one allocator block (one handle) share one mapping,
/// looked up once. Each region `(descriptor, cookie)` is checked first
/// ([`StorageDescriptor::check`], the producer is another process), then against the real
/// size of the producer's allocation once mapped; each part must lie inside its region
/// (the caller checked it; C++ checks again). `label(i)` names region `i` in errors
/// (`region 3`). Returns the storages in the order of `parts`.
pub(crate) fn open_regions(
    descs: &[(&StorageDescriptor, u64)],
    parts: &[ffi::Part],
    label: &dyn Fn(usize) -> String,
) -> Result<Vec<ffi::OwnedStorage>> {
    cuda::require()?;
    let me = ProcessId::current();
    let mut devices: Vec<(GpuId, u32)> = Vec::new();
    let mut imports = Vec::with_capacity(descs.len());
    for (i, (desc, cookie)) in descs.iter().enumerate() {
        desc.check().map_err(|e| Error::Protocol(format!("{}: {e}", label(i))))?;
        if desc.producer == me {
            return Err(Error::SelfImport { pid: desc.producer.pid });
        }
        let device = match devices.iter().find(|(gpu, _)| *gpu == desc.device) {
            Some((_, local)) => *local,
            None => {
                let local = desc.device.local_index()?;
                devices.push((desc.device, local));
                local
            }
        };
        imports.push(ffi::Import {
            handle: &desc.handle,
            offset: desc.offset,
            nbytes: desc.nbytes,
            device: device as i32,
            producer: desc.producer.instance,
            cookie: *cookie,
        });
    }
    ffi::import_regions(&imports, parts).map_err(|e| {
        let Some(index) = e.index else { return Error::cuda("opening IPC handles", e.message) };
        let desc = descs[index].0;
        if let Some(allocation) = e.allocation {
            return Error::Protocol(format!(
                "{}: offset {} + nbytes {} exceeds the allocation ({allocation} bytes)",
                label(index),
                desc.offset,
                desc.nbytes
            ));
        }
        // c10's handles are [version, type, ...]; type 'e' is an expandable segment.
        if desc.handle.get(1) == Some(&b'e') {
            Error::cuda(
                "opening an IPC handle",
                format!(
                    "{}: {}; the producer runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, whose memory \
                     is shared through file descriptors (pidfd_getfd), which this host refused: run the producer \
                     without expandable_segments",
                    label(index),
                    e.message
                ),
            )
        } else {
            Error::cuda("opening an IPC handle", format!("{}: {}", label(index), e.message))
        }
    })
}

/// Drops this process's cached mappings of a producer's memory (its connection closed);
/// tensors still using them keep them open until they are dropped.
pub(crate) fn forget_producer(producer: &ProcessId) {
    if cuda::device_count() > 0 {
        ffi::forget_producer(producer.instance);
    }
}

/// Mappings of other processes' memory open in this process (cached or in use).
///
/// ```
/// let open = shared_tensor_runtime::ipc::open_mappings();
/// println!("{open} mappings of other processes' GPU memory are open");
/// ```
pub fn open_mappings() -> u64 {
    if cuda::device_count() > 0 {
        ffi::mapping_count()
    } else {
        0
    }
}

/// Mappings of other processes' memory this process has opened since it started; finding
/// one in the mapping cache does not count. Storages carved from one allocator block share
/// one mapping, so this grows by the number of blocks, not of tensors.
///
/// ```no_run
/// # fn fetch_state_dict() {}
/// let before = shared_tensor_runtime::ipc::mappings_opened();
/// fetch_state_dict(); // 290 tensors the server cut from one allocation
/// let opened = shared_tensor_runtime::ipc::mappings_opened() - before;
/// println!("{opened} mapping(s) opened for 290 tensors");
/// ```
pub fn mappings_opened() -> u64 {
    if cuda::device_count() > 0 {
        ffi::mappings_opened()
    } else {
        0
    }
}

/// A tensor over an opened storage.
pub(crate) fn view_tensor(storage: &ffi::OwnedStorage, view: &TensorView) -> Result<Tensor> {
    ffi::tensor_from_storage(
        storage,
        view.dtype.scalar_type(),
        &view.sizes,
        &view.strides,
        view.storage_offset,
        view.requires_grad,
    )
    .map_err(|m| Error::cuda("building a tensor over shared memory", m))
}

/// Rebuilds a tensor exported by another process: a view of the producer's GPU memory,
/// which stays mapped until the last tensor over it is dropped. The calling thread's
/// current stream waits for the producer's ready event first.
///
/// Fails with [`Error::SelfImport`] in the exporting process (CUDA forbids it), with
/// [`Error::DeviceNotVisible`] if this process cannot see the producer's GPU, and with
/// [`Error::Protocol`] naming the field for a descriptor that does not describe memory
/// inside the producer's allocation: a negative offset, `offset + nbytes` past the end of
/// the allocation (the driver's size of the mapped block), or a view past its storage.
/// Nothing is mapped for a descriptor that fails the checks that need no GPU.
///
/// ```no_run
/// # fn main() -> shared_tensor_runtime::Result<()> {
/// # let bytes: Vec<u8> = Vec::new();
/// let descriptor: shared_tensor_runtime::ipc::TensorDescriptor = rmp_serde::from_slice(&bytes).unwrap();
/// let t = shared_tensor_runtime::ipc::import(&descriptor)?; // the producer's memory, not a copy
/// println!("{:?} on {:?}", t.size(), t.device());
/// # Ok(()) }
/// ```
pub fn import(desc: &TensorDescriptor) -> Result<Tensor> {
    desc.view.check(Some(desc.storage.nbytes)).map_err(|e| Error::Protocol(format!("descriptor.view: {e}")))?;
    let (storage, device) = open_storage(&desc.storage, 0)?;
    if let Some(ready) = &desc.ready {
        ready.wait(device)?;
    }
    view_tensor(&storage, &desc.view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_round_trip_through_kind_and_scalar_type() {
        for (dtype, kind, st) in DTYPES {
            assert_eq!(DType::from_kind(kind), Some(dtype));
            assert_eq!(dtype.kind(), kind);
            assert_eq!(DType::from_scalar_type(st), Some(dtype));
            assert_eq!(dtype.scalar_type(), st);
        }
        assert_eq!(DType::from_kind(Kind::QInt8), None);
    }

    #[test]
    fn uuid_string_is_canonical() {
        let gpu = GpuId { index: 1, uuid: *b"\x01\x23\x45\x67\x89\xab\xcd\xef\x01\x23\x45\x67\x89\xab\xcd\xef" };
        assert_eq!(gpu.uuid_string(), "01234567-89ab-cdef-0123-456789abcdef");
    }

    #[test]
    fn descriptors_round_trip_through_messagepack() {
        let desc = TensorDescriptor {
            storage: StorageDescriptor {
                handle: vec![1, 2, 3],
                offset: 512,
                nbytes: 4096,
                device: GpuId { index: 0, uuid: [9; 16] },
                producer: ProcessId { pid: 42, instance: 7 },
            },
            view: TensorView {
                dtype: DType::BF16,
                sizes: vec![2, 3].into(),
                strides: vec![1, 2].into(),
                storage_offset: 5,
                requires_grad: true,
            },
            ready: Some(EventHandle(serde_bytes::ByteArray::new([3; 64]))),
        };
        let bytes = rmp_serde::to_vec(&desc).unwrap();
        let back: TensorDescriptor = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(back, desc);
    }

    #[test]
    fn cpu_tensors_are_refused_before_anything_is_shared() {
        let t = Tensor::ones([3], (Kind::Float, tch::Device::Cpu));
        let err = match inspect(&t, &|| "encoder.weight".into()) {
            Err(e) => e,
            Ok(_) => panic!("a CPU tensor passed inspection"),
        };
        assert!(matches!(&err, Error::NotCuda { path, .. } if path == "encoder.weight"), "{err}");
        assert!(err.to_string().contains("encoder.weight is on Cpu"), "{err}");
    }

    #[test]
    fn view_tensor_builds_views_and_refuses_those_past_the_storage_as_cuda_errors() {
        // 16 floats: 64 bytes (a CPU storage stands in for a mapped one).
        let base = Tensor::arange(16, (Kind::Float, tch::Device::Cpu));
        let storage = ffi::inspect(&base, true).unwrap().storage.unwrap();
        let mut view = TensorView {
            dtype: DType::F32,
            sizes: vec![4, 4].into(),
            strides: vec![1, 4].into(),
            storage_offset: 0,
            requires_grad: true,
        };
        let t = view_tensor(&storage, &view).unwrap();
        assert_eq!((t.size(), t.stride(), t.data_ptr()), (vec![4, 4], vec![1, 4], base.data_ptr()));
        assert!(t.requires_grad() && !t.is_contiguous());
        assert_eq!(view_of(&t).unwrap(), view);
        // payload::Decoder::tensor turns a Cuda error from here into "does not fit its storage".
        view.storage_offset = 1;
        match view_tensor(&storage, &view) {
            Err(Error::Cuda { message, .. }) => {
                assert!(message.contains("needs 68 bytes of storage from offset 1 but the storage has 64"), "{message}")
            }
            other => panic!("expected a Cuda error, got {other:?}"),
        }
    }
}
