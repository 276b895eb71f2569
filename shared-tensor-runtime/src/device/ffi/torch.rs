//! The C ABI of `csrc/st_ipc.cpp` and safe wrappers around it (the `cuda` feature). The
//! ABI is declared once in `csrc/st_ipc.h`, which the C++ includes; the declarations here
//! mirror it, and the struct layouts are asserted at compile time on both sides.
//!
//! Rules every wrapper keeps:
//! - The C++ side never throws across the boundary: each function returns null on success
//!   or a `malloc`ed message that [`check`] turns into a `String` and frees exactly once.
//! - A `*const C_tensor` passed in comes from a live `tch::Tensor` borrowed for the whole
//!   call, so it is a valid `at::Tensor*` (torch-sys's `C_tensor` is `at::Tensor`).
//! - A `*mut C_tensor` that C++ returns is a fresh `new at::Tensor`, whose ownership moves
//!   into a `tch::Tensor` (which deletes it on drop).
//! - [`OwnedStorage`] owns one reference of a `c10::StorageImpl`'s atomic refcount (the
//!   pointer is the `StorageImpl` itself) and gives it back exactly once, on drop.

use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use tch::Tensor;
use torch_sys::C_tensor;

/// A tensor's sizes or strides, one per dimension: kept inline for up to six dimensions,
/// so describing a tensor allocates nothing (a 290-tensor state dict crosses four such
/// descriptions per call). It derefs to `[i64]` and converts from a `Vec` or a slice.
///
/// ```
/// use shared_tensor_runtime::ipc::Dims;
/// let sizes: Dims = vec![3, 2].into();
/// assert_eq!(sizes.as_slice(), &[3, 2]);
/// assert!(!sizes.spilled()); // inline: no heap allocation
/// assert_eq!(Dims::from_slice(&[1, 3]).iter().product::<i64>(), 3);
/// ```
pub type Dims = smallvec::SmallVec<[i64; 6]>;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct InitInfo {
    pub device_count: i32,
    pub warp_size: i32,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct TensorMeta {
    pub defined: i32,
    pub device_type: i32,
    pub device_index: i32,
    pub scalar_type: i32,
    pub requires_grad: i32,
    pub ndim: i32,
    pub storage_offset: i64,
    pub storage_base: u64,
    pub storage_nbytes: u64,
    pub import_cookie: u64,
    pub import_part: u64,
}

/// c10's DeviceType for CUDA.
pub(crate) const DEVICE_TYPE_CUDA: i32 = 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct AllocStats {
    pub allocated_bytes: u64,
    pub reserved_bytes: u64,
    pub free_bytes: u64,
    pub total_bytes: u64,
}

/// `st_import_spec`: one region to import. `handle` points at `handle_len` bytes that
/// live for the whole `st_regions_import` call.
#[repr(C)]
struct ImportSpec {
    handle: *const u8,
    handle_len: u64,
    offset: i64,
    nbytes: u64,
    device: i32,
    producer: u64,
    cookie: u64,
}

/// `st_part_spec`: one storage to build over a region.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Part {
    /// Index of its region in the call.
    pub region: u64,
    /// Byte offset in the region.
    pub offset: u64,
    pub nbytes: u64,
    /// Its place among its region's parts.
    pub index: u64,
}

/// One region of another process's block to import (see [`import_regions`]).
pub(crate) struct Import<'a> {
    pub handle: &'a [u8],
    pub offset: i64,
    pub nbytes: u64,
    pub device: i32,
    pub producer: u64,
    pub cookie: u64,
}

/// Why [`import_regions`] failed, and for which of its regions.
#[derive(Debug)]
pub(crate) struct ImportError {
    /// Index of the region in the call (`None`: not tied to one).
    pub index: Option<usize>,
    /// The size of the producer's allocation when the region does not fit in it.
    pub allocation: Option<u64>,
    pub message: String,
}

// The layouts of the structs above, as `csrc/st_ipc.h` asserts them on the C++ side (the
// header is the one declaration of this ABI; keep the two lists equal).
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<InitInfo>() == 8);
    assert!(size_of::<TensorMeta>() == 64);
    assert!(offset_of!(TensorMeta, ndim) == 20);
    assert!(offset_of!(TensorMeta, storage_offset) == 24);
    assert!(offset_of!(TensorMeta, import_part) == 56);
    assert!(size_of::<AllocStats>() == 32);
    assert!(size_of::<ImportSpec>() == 56);
    assert!(offset_of!(ImportSpec, device) == 32);
    assert!(offset_of!(ImportSpec, producer) == 40);
    assert!(size_of::<Part>() == 32);
};

/// Opaque `st_storage`: a `c10::StorageImpl`, through a pointer that owns one reference.
#[repr(C)]
pub(crate) struct RawStorage {
    _private: [u8; 0],
}

/// Called by the C++ side when the last reference to a leased import goes: the cookie,
/// and the device and stream (`cudaStream_t` as an integer) whose queued work must be done
/// before the lender is told.
pub(crate) type ReleaseFn = extern "C" fn(cookie: u64, device: i32, stream: u64);

extern "C" {
    fn st_free_error(err: *mut c_char);
    fn st_set_release_fn(f: ReleaseFn);
    fn st_stream_settled(device: i32, stream: u64) -> i32;
    fn st_init(info: *mut InitInfo) -> *mut c_char;
    fn st_current_device(out: *mut i32) -> *mut c_char;
    fn st_device_uuid(device: i32, out: *mut u8) -> *mut c_char;
    fn st_tensor_inspect(
        t: *const C_tensor,
        meta: *mut TensorMeta,
        sizes: *mut i64,
        strides: *mut i64,
        cap: i32,
        storage_out: *mut *mut RawStorage,
    ) -> *mut c_char;
    fn st_storage_free(s: *mut RawStorage);
    fn st_storage_incref(s: *const RawStorage);
    fn st_storage_allocation(s: *const RawStorage, base: *mut u64, size: *mut u64) -> *mut c_char;
    fn st_storage_export(s: *const RawStorage, buf: *mut u8, cap: u64, len: *mut u64, offset: *mut i64) -> *mut c_char;
    fn st_regions_import(
        regions: *const ImportSpec,
        n_regions: u64,
        parts: *const Part,
        n_parts: u64,
        out: *mut *mut RawStorage,
        failed: *mut u64,
        alloc_bytes: *mut u64,
    ) -> *mut c_char;
    fn st_ipc_forget_producer(producer: u64);
    fn st_ipc_mapping_count() -> u64;
    fn st_ipc_mappings_opened() -> u64;
    fn st_tensor_from_storage(
        s: *const RawStorage,
        scalar_type: i32,
        sizes: *const i64,
        strides: *const i64,
        ndim: i32,
        storage_offset: i64,
        requires_grad: i32,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn st_stream_idle(device: i32, idle: *mut i32) -> *mut c_char;
    fn st_event_record(device: i32, out: *mut u8) -> *mut c_char;
    fn st_event_wait(device: i32, handle: *const u8) -> *mut c_char;
    fn st_synchronize(device: i32) -> *mut c_char;
    fn st_stream_synchronize(device: i32) -> *mut c_char;
    fn st_memory_stats(device: i32, out: *mut AllocStats) -> *mut c_char;
    fn st_empty_cache() -> *mut c_char;
}

/// Turns the C++ side's error return into a `Result`, freeing the message.
fn check(err: *mut c_char) -> Result<(), String> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string from malloc in st_ipc.cpp that
    // nothing else references; we copy it and free it exactly once here.
    let msg = unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned();
    // SAFETY: as above; `err` came from st_ipc.cpp's malloc and is not used after this.
    unsafe { st_free_error(err) };
    Err(msg)
}

/// An owning reference to a c10 storage: keeps its memory (and, for an imported storage,
/// its IPC mapping) alive until dropped.
pub(crate) struct OwnedStorage(NonNull<RawStorage>);

// SAFETY: a c10::Storage is an intrusive_ptr with an atomic refcount; creating, using
// (read-only) and dropping references from any thread is what libtorch itself does.
unsafe impl Send for OwnedStorage {}
// SAFETY: every function taking `&OwnedStorage` only reads the storage handle.
unsafe impl Sync for OwnedStorage {}

impl Drop for OwnedStorage {
    fn drop(&mut self) {
        // SAFETY: the pointer came from st_tensor_inspect, st_regions_import or
        // `clone_ref`, with one reference that this value alone owns and gives back only
        // here.
        unsafe { st_storage_free(self.0.as_ptr()) }
    }
}

impl OwnedStorage {
    /// Another owning reference to the same storage (the same memory, one more refcount).
    pub(crate) fn clone_ref(&self) -> OwnedStorage {
        // SAFETY: `self.0` is a live StorageImpl (this value holds a reference to it), so
        // incrementing its refcount is valid; the new reference is owned by the value
        // returned, which gives it back on drop.
        unsafe { st_storage_incref(self.0.as_ptr()) };
        OwnedStorage(self.0)
    }

    fn from_raw(ptr: *mut RawStorage) -> Result<Self, String> {
        NonNull::new(ptr).map(OwnedStorage).ok_or_else(|| "st_ipc returned no storage".to_string())
    }
}

pub(crate) fn set_release_fn(f: ReleaseFn) {
    // SAFETY: stores a plain function pointer; `f` is a Rust `extern "C"` fn that never unwinds.
    unsafe { st_set_release_fn(f) }
}

pub(crate) fn init() -> Result<InitInfo, String> {
    let mut info = InitInfo::default();
    // SAFETY: `info` is a valid out-pointer for the duration of the call.
    check(unsafe { st_init(&mut info) })?;
    Ok(info)
}

pub(crate) fn current_device() -> Result<i32, String> {
    let mut out = 0i32;
    // SAFETY: `out` is a valid out-pointer for the duration of the call.
    check(unsafe { st_current_device(&mut out) })?;
    Ok(out)
}

pub(crate) fn device_uuid(device: i32) -> Result<[u8; 16], String> {
    let mut out = [0u8; 16];
    // SAFETY: `out` has the 16 bytes st_device_uuid writes.
    check(unsafe { st_device_uuid(device, out.as_mut_ptr()) })?;
    Ok(out)
}

/// What st_tensor_inspect reports: metadata, sizes, strides, and (when asked) the storage.
pub(crate) struct Inspected {
    pub meta: TensorMeta,
    pub sizes: Dims,
    pub strides: Dims,
    pub storage: Option<OwnedStorage>,
}

pub(crate) fn inspect(t: &Tensor, want_storage: bool) -> Result<Inspected, String> {
    // Up to 16 dimensions on the stack (no allocation); more only for the rare tensor
    // that has them.
    const STACK: usize = 16;
    let mut cap = STACK;
    let mut heap: Vec<i64> = Vec::new();
    loop {
        let mut meta = TensorMeta::default();
        let mut stack = [0i64; 2 * STACK];
        let buf: &mut [i64] = if cap == STACK {
            &mut stack
        } else {
            heap.resize(2 * cap, 0);
            &mut heap
        };
        let (sizes, strides) = buf.split_at_mut(cap);
        let mut raw: *mut RawStorage = std::ptr::null_mut();
        let storage_out = if want_storage { &mut raw as *mut _ } else { std::ptr::null_mut() };
        // SAFETY: `t` is borrowed for the call, so `as_ptr` is a live at::Tensor*; the
        // buffers hold `cap` elements each, the bound passed; `storage_out` is null or valid.
        let res = check(unsafe {
            st_tensor_inspect(t.as_ptr(), &mut meta, sizes.as_mut_ptr(), strides.as_mut_ptr(), cap as i32, storage_out)
        });
        // Take ownership of the storage before looking at the result, so it is freed on error.
        let storage = if raw.is_null() { None } else { Some(OwnedStorage::from_raw(raw)?) };
        res?;
        let ndim = usize::try_from(meta.ndim).unwrap_or(0);
        if ndim > cap {
            cap = ndim;
            continue;
        }
        return Ok(Inspected {
            meta,
            sizes: Dims::from_slice(&sizes[..ndim]),
            strides: Dims::from_slice(&strides[..ndim]),
            storage,
        });
    }
}

/// The start address and size of the driver allocation (`cudaMalloc` segment) holding
/// `storage`'s first byte; `(0, 0)` for an empty or non-CUDA storage.
pub(crate) fn storage_allocation(storage: &OwnedStorage) -> Result<(u64, u64), String> {
    let (mut base, mut size) = (0u64, 0u64);
    // SAFETY: `storage` is a live st_storage; `base` and `size` are valid out-pointers.
    check(unsafe { st_storage_allocation(storage.0.as_ptr(), &mut base, &mut size) })?;
    Ok((base, size))
}

/// The IPC handle of the allocator block holding `storage` and the storage's byte
/// offset in it. An empty storage gives an empty handle.
pub(crate) fn export_storage(storage: &OwnedStorage) -> Result<(Vec<u8>, i64), String> {
    let mut buf = vec![0u8; 128];
    loop {
        let mut len = 0u64;
        let mut offset = 0i64;
        // SAFETY: `storage` is a live st_storage; `buf` has `buf.len()` writable bytes.
        check(unsafe {
            st_storage_export(storage.0.as_ptr(), buf.as_mut_ptr(), buf.len() as u64, &mut len, &mut offset)
        })?;
        let len = usize::try_from(len).map_err(|_| "IPC handle length overflows usize".to_string())?;
        if len > buf.len() {
            buf.resize(len, 0);
            continue;
        }
        buf.truncate(len);
        return Ok((buf, offset));
    }
}

/// Maps other processes' blocks and builds one storage per part of the regions, in one
/// call: regions naming one block share one mapping (opened once, or found in the cache).
/// Each region's `offset + nbytes` is checked against the size of the producer's
/// allocation (the driver's), and each part against its region, before any storage is
/// built. When the last storage over a region's parts goes, the release function gets the
/// region's `cookie` (if non-zero). Returns the storages in the order of `parts`.
pub(crate) fn import_regions(regions: &[Import<'_>], parts: &[Part]) -> Result<Vec<OwnedStorage>, ImportError> {
    let specs: Vec<ImportSpec> = regions
        .iter()
        .map(|i| ImportSpec {
            handle: i.handle.as_ptr(),
            handle_len: i.handle.len() as u64,
            offset: i.offset,
            nbytes: i.nbytes,
            device: i.device,
            producer: i.producer,
            cookie: i.cookie,
        })
        .collect();
    let mut out: Vec<*mut RawStorage> = vec![std::ptr::null_mut(); parts.len()];
    let (mut failed, mut alloc_bytes) = (u64::MAX, u64::MAX);
    // SAFETY: `specs` holds `specs.len()` entries whose handle pointers borrow `regions`
    // for the call; `parts` is read only; `out` has room for one storage per part;
    // `failed`/`alloc_bytes` are valid out-pointers. CUDA was initialised by the caller
    // (crate::device::cuda::require), which getIpcDevPtr needs. On error the C++ side frees
    // whatever it built and leaves `out`.
    let res = check(unsafe {
        st_regions_import(
            specs.as_ptr(),
            specs.len() as u64,
            parts.as_ptr(),
            parts.len() as u64,
            out.as_mut_ptr(),
            &mut failed,
            &mut alloc_bytes,
        )
    });
    if let Err(message) = res {
        return Err(ImportError {
            index: usize::try_from(failed).ok().filter(|i| *i < regions.len()),
            allocation: (alloc_bytes != u64::MAX).then_some(alloc_bytes),
            message,
        });
    }
    out.into_iter().map(OwnedStorage::from_raw).collect::<Result<_, _>>().map_err(|message| ImportError {
        index: None,
        allocation: None,
        message,
    })
}

/// Drops the mapping cache's references to one producer's blocks.
pub(crate) fn forget_producer(producer: u64) {
    // SAFETY: no pointers are passed; the C++ side never throws here.
    unsafe { st_ipc_forget_producer(producer) }
}

/// Mappings of other processes' blocks this process has opened since it started.
pub(crate) fn mappings_opened() -> u64 {
    // SAFETY: no pointers are passed.
    unsafe { st_ipc_mappings_opened() }
}

/// Mappings of other processes' blocks open in this process.
pub(crate) fn mapping_count() -> u64 {
    // SAFETY: no pointers are passed.
    unsafe { st_ipc_mapping_count() }
}

/// A new tensor over `storage`: `scalar_type` elements, `sizes` and `strides` in elements,
/// starting `storage_offset` elements in. The C++ side builds the TensorImpl directly (no
/// dispatcher call) and refuses, with a message naming the numbers, a negative size,
/// stride or offset, a non-empty view that does not lie inside the storage, and
/// `requires_grad` on a dtype that cannot require grad.
pub(crate) fn tensor_from_storage(
    storage: &OwnedStorage,
    scalar_type: i32,
    sizes: &[i64],
    strides: &[i64],
    storage_offset: i64,
    requires_grad: bool,
) -> Result<Tensor, String> {
    if sizes.len() != strides.len() {
        return Err(format!("{} sizes but {} strides", sizes.len(), strides.len()));
    }
    let ndim = i32::try_from(sizes.len()).map_err(|_| "too many dimensions".to_string())?;
    let mut out: *mut C_tensor = std::ptr::null_mut();
    // SAFETY: `storage` is live (borrowed for the call); `sizes`/`strides` hold `ndim`
    // elements each and are only read; `out` is a valid out-pointer. The C++ side checks
    // the view against the storage's size before building anything over it.
    check(unsafe {
        st_tensor_from_storage(
            storage.0.as_ptr(),
            scalar_type,
            sizes.as_ptr(),
            strides.as_ptr(),
            ndim,
            storage_offset,
            i32::from(requires_grad),
            &mut out,
        )
    })?;
    if out.is_null() {
        return Err("st_ipc returned no tensor".into());
    }
    // SAFETY: `out` is a fresh `new at::Tensor` that nothing else owns; tch::Tensor takes
    // ownership and deletes it on drop.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Whether `stream` on `device` has finished its queued work (never waits). Errors count
/// as finished (see `st_stream_settled`).
pub(crate) fn stream_settled(device: i32, stream: u64) -> bool {
    // SAFETY: plain values in; the C++ side treats `stream` as a cudaStream_t handed to it
    // by `import_deleter` (c10's streams are never destroyed) and catches every error.
    unsafe { st_stream_settled(device, stream) != 0 }
}

pub(crate) fn stream_idle(device: i32) -> Result<bool, String> {
    let mut idle = 0i32;
    // SAFETY: `idle` is a valid out-pointer for the duration of the call.
    check(unsafe { st_stream_idle(device, &mut idle) })?;
    Ok(idle != 0)
}

pub(crate) fn event_record(device: i32) -> Result<[u8; 64], String> {
    let mut out = [0u8; 64];
    // SAFETY: `out` has the 64 bytes of a cudaIpcEventHandle_t that the call writes.
    check(unsafe { st_event_record(device, out.as_mut_ptr()) })?;
    Ok(out)
}

pub(crate) fn event_wait(device: i32, handle: &[u8; 64]) -> Result<(), String> {
    // SAFETY: `handle` is 64 readable bytes.
    check(unsafe { st_event_wait(device, handle.as_ptr()) })
}

pub(crate) fn synchronize(device: i32) -> Result<(), String> {
    // SAFETY: no pointers are passed.
    check(unsafe { st_synchronize(device) })
}

pub(crate) fn stream_synchronize(device: i32) -> Result<(), String> {
    // SAFETY: no pointers are passed.
    check(unsafe { st_stream_synchronize(device) })
}

pub(crate) fn memory_stats(device: i32) -> Result<AllocStats, String> {
    let mut out = AllocStats::default();
    // SAFETY: `out` is a valid out-pointer for the duration of the call.
    check(unsafe { st_memory_stats(device, &mut out) })?;
    Ok(out)
}

pub(crate) fn empty_cache() -> Result<(), String> {
    // SAFETY: no pointers are passed.
    check(unsafe { st_empty_cache() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;
    use tch::{Device, Kind};

    /// c10 ScalarType numbers used below.
    const FLOAT: i32 = 6;
    const INT64: i32 = 4;
    const QINT8: i32 = 12;

    /// The storage of a CPU tensor and its view, as `ffi::inspect` reports them.
    fn parts(t: &Tensor) -> (OwnedStorage, Inspected) {
        let mut ins = inspect(t, true).unwrap();
        let storage = ins.storage.take().expect("a strided CPU tensor has a storage");
        (storage, ins)
    }

    /// Builds a tensor over `t`'s storage with `t`'s view through `tensor_from_storage`.
    fn rebuild(t: &Tensor, requires_grad: bool) -> Result<Tensor, String> {
        let (storage, ins) = parts(t);
        tensor_from_storage(
            &storage,
            ins.meta.scalar_type,
            &ins.sizes,
            &ins.strides,
            ins.meta.storage_offset,
            requires_grad,
        )
    }

    /// Builds `view` over the storage of a tensor of `elements` floats.
    fn over_floats(elements: i64, sizes: &[i64], strides: &[i64], offset: i64) -> Result<Tensor, String> {
        let base = Tensor::zeros([elements], (Kind::Float, Device::Cpu));
        let (storage, _) = parts(&base);
        tensor_from_storage(&storage, FLOAT, sizes, strides, offset, false)
    }

    /// Rebuilds `t` and checks the result is the same view of the same memory.
    fn assert_rebuilds(t: &Tensor) -> Tensor {
        let back = rebuild(t, false).unwrap();
        let (want, got) = (inspect(t, false).unwrap(), inspect(&back, false).unwrap());
        assert_eq!(back.device(), t.device());
        assert_eq!(back.kind(), t.kind());
        assert_eq!(back.size(), t.size());
        assert_eq!(back.stride(), t.stride());
        assert_eq!(got.meta.storage_offset, want.meta.storage_offset);
        assert_eq!(got.meta.storage_base, want.meta.storage_base, "not the same storage");
        assert_eq!(got.meta.storage_nbytes, want.meta.storage_nbytes);
        assert_eq!(back.data_ptr(), t.data_ptr());
        assert_eq!(back.is_contiguous(), t.is_contiguous());
        assert_eq!(back.numel(), t.numel());
        assert!(!back.requires_grad());
        assert!(back.equal(t), "values differ: {back:?} vs {t:?}");
        back
    }

    #[test]
    fn rebuilds_a_contiguous_tensor_sharing_its_memory() {
        let t = Tensor::arange(24, (Kind::Float, Device::Cpu)).reshape([2, 3, 4]);
        let back = assert_rebuilds(&t);
        assert!(back.is_contiguous());
        // Shared memory, not a copy: a write through one is seen through the other.
        let _ = back.get(1).get(2).fill_(-7.0);
        assert_eq!(t.double_value(&[1, 2, 0]), -7.0);
        // The new tensor owns a reference to the storage: it outlives the original.
        let expected = Vec::<f32>::try_from(t.flatten(0, -1)).unwrap();
        drop(t);
        assert_eq!(Vec::<f32>::try_from(back.flatten(0, -1)).unwrap(), expected);
    }

    #[test]
    fn rebuilds_a_transposed_view() {
        let base = Tensor::arange(24, (Kind::Int64, Device::Cpu)).reshape([2, 3, 4]);
        let t = base.transpose(0, 2);
        let back = assert_rebuilds(&t);
        assert_eq!(back.stride(), vec![1, 4, 12]);
        assert!(!back.is_contiguous());
        assert!(back.contiguous().equal(&t.contiguous()));
    }

    #[test]
    fn rebuilds_a_narrowed_view_with_a_storage_offset() {
        let base = Tensor::arange(40, (Kind::Double, Device::Cpu)).reshape([4, 10]);
        let t = base.narrow(0, 1, 2).narrow(1, 3, 5);
        let back = assert_rebuilds(&t);
        assert_eq!(inspect(&back, false).unwrap().meta.storage_offset, 13);
        assert_eq!(back.double_value(&[0, 0]), 13.0);
        assert_eq!(back.double_value(&[1, 4]), 27.0);
        // The last element of a 1-d storage, exactly at its end.
        let last = Tensor::arange(10, (Kind::Float, Device::Cpu)).narrow(0, 9, 1);
        assert_eq!(assert_rebuilds(&last).double_value(&[0]), 9.0);
    }

    #[test]
    fn rebuilds_empty_tensors() {
        let t = Tensor::zeros([0, 3], (Kind::Float, Device::Cpu));
        assert_eq!(assert_rebuilds(&t).size(), vec![0, 3]);
        // An empty view at the very end of a non-empty storage.
        let end = Tensor::arange(10, (Kind::Float, Device::Cpu)).narrow(0, 10, 0);
        assert_eq!(assert_rebuilds(&end).numel(), 0);
        // As ATen's bounds rule has it, a view without elements fits any storage.
        assert_eq!(over_floats(4, &[0, 1000], &[1000, 1], 1 << 40).unwrap().size(), vec![0, 1000]);
    }

    #[test]
    fn rebuilds_zero_dim_scalars() {
        let t = Tensor::from(2.5f64);
        assert_eq!(t.dim(), 0);
        let back = assert_rebuilds(&t);
        assert_eq!((back.dim(), back.double_value(&[])), (0, 2.5));
        // A 0-dim view into a larger storage, at an offset.
        let base = Tensor::arange(12, (Kind::Int64, Device::Cpu)).reshape([3, 4]);
        let t = base.get(2).get(1);
        let back = assert_rebuilds(&t);
        assert_eq!((back.dim(), back.int64_value(&[])), (0, 9));
        assert_eq!(inspect(&back, false).unwrap().meta.storage_offset, 9);
    }

    #[test]
    fn requires_grad_makes_an_autograd_leaf() {
        let t = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        let back = rebuild(&t, true).unwrap();
        assert!(back.requires_grad());
        assert!(back.is_leaf());
        assert_eq!(back.data_ptr(), t.data_ptr());
        (&back * &back).sum(Kind::Float).backward();
        assert!(back.grad().equal(&(&t * 2)));
        // Without it, no grad.
        assert!(!rebuild(&t, false).unwrap().requires_grad());
        // Complex dtypes can require grad too.
        let c = Tensor::zeros([2], (Kind::ComplexFloat, Device::Cpu));
        assert!(rebuild(&c, true).unwrap().requires_grad());
    }

    #[test]
    fn requires_grad_on_an_integer_dtype_is_an_error() {
        let t = Tensor::arange(4, (Kind::Int64, Device::Cpu));
        let err = rebuild(&t, true).unwrap_err();
        assert!(err.contains("floating point"), "{err}");
    }

    #[test]
    fn views_that_do_not_fit_their_storage_are_refused() {
        // 16 floats: 64 bytes.
        let err = over_floats(16, &[4, 5], &[5, 1], 0).unwrap_err();
        assert!(err.contains("needs 80 bytes of storage from offset 0 but the storage has 64"), "{err}");
        assert!(err.contains("sizes [4, 5], strides [5, 1], 4-byte elements"), "{err}");
        let err = over_floats(16, &[16], &[1], 1).unwrap_err();
        assert!(err.contains("needs 68 bytes of storage from offset 1 but the storage has 64"), "{err}");
        // A 0-dim view just past the end.
        let err = over_floats(16, &[], &[], 16).unwrap_err();
        assert!(err.contains("needs 68 bytes of storage from offset 16 but the storage has 64"), "{err}");
        // Strides that reach past the end although the element count is small.
        let err = over_floats(16, &[2, 2], &[1, 16], 0).unwrap_err();
        assert!(err.contains("needs 72 bytes of storage from offset 0 but the storage has 64"), "{err}");
        // Exactly fitting views pass.
        assert!(over_floats(16, &[4, 4], &[4, 1], 0).is_ok());
        assert!(over_floats(16, &[2, 2], &[1, 14], 0).is_ok());
        assert!(over_floats(16, &[], &[], 15).is_ok());
    }

    #[test]
    fn negative_sizes_strides_and_offsets_are_refused() {
        let err = over_floats(16, &[4], &[-1], 3).unwrap_err();
        assert!(err.contains("stride -1 of dimension 0 is negative"), "{err}");
        let err = over_floats(16, &[2, -3], &[3, 1], 0).unwrap_err();
        assert!(err.contains("size -3 of dimension 1 is negative"), "{err}");
        let err = over_floats(16, &[2], &[1], -1).unwrap_err();
        assert!(err.contains("storage offset -1 is negative"), "{err}");
    }

    #[test]
    fn overflowing_views_are_refused() {
        let err = over_floats(16, &[2, 2], &[i64::MAX, 1], 0).unwrap_err();
        assert!(err.contains("needs more storage than a 64-bit count can hold"), "{err}");
        assert!(err.contains(&format!("strides [{}, 1]", i64::MAX)), "{err}");
        let err = over_floats(16, &[1], &[1], i64::MAX).unwrap_err();
        assert!(err.contains("needs more storage than a 64-bit count can hold"), "{err}");
        // Fits in elements but not in bytes.
        let err = over_floats(16, &[1 << 62], &[1], 0).unwrap_err();
        assert!(err.contains("needs more storage than a 64-bit count can hold"), "{err}");
    }

    #[test]
    fn bad_dtypes_and_shapes_are_refused() {
        let base = Tensor::zeros([4], (Kind::Float, Device::Cpu));
        let (storage, _) = parts(&base);
        let err = tensor_from_storage(&storage, 99, &[1], &[1], 0, false).unwrap_err();
        assert!(err.contains("unknown scalar type 99"), "{err}");
        let err = tensor_from_storage(&storage, -1, &[1], &[1], 0, false).unwrap_err();
        assert!(err.contains("unknown scalar type -1"), "{err}");
        let err = tensor_from_storage(&storage, QINT8, &[1], &[1], 0, false).unwrap_err();
        assert!(err.contains("cannot be viewed over a storage"), "{err}");
        let err = tensor_from_storage(&storage, FLOAT, &[1, 2], &[1], 0, false).unwrap_err();
        assert_eq!(err, "2 sizes but 1 strides");
        // Another dtype over the same bytes: 16 bytes hold two int64s, not three.
        let t = tensor_from_storage(&storage, INT64, &[2], &[1], 0, false).unwrap();
        assert_eq!((t.kind(), t.data_ptr()), (Kind::Int64, base.data_ptr()));
        let err = tensor_from_storage(&storage, INT64, &[3], &[1], 0, false).unwrap_err();
        assert!(err.contains("needs 24 bytes of storage from offset 0 but the storage has 16"), "{err}");
    }

    /// Median nanoseconds per call of `f`, timed in batches of 100 calls.
    fn p50_ns(mut f: impl FnMut()) -> f64 {
        const BATCH: u32 = 100;
        let mut times: Vec<f64> = (0..200)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..BATCH {
                    f();
                }
                start.elapsed().as_secs_f64() * 1e9 / f64::from(BATCH)
            })
            .collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    }

    /// Rebuilds views of a CUDA tensor over its storage.
    #[test]
    #[ignore = "GPU: runs in the GPU bundle (cargo xtask gpu-bundle)"]
    fn gpu_rebuilds_cuda_views() {
        let base = Tensor::arange(64, (Kind::Float, Device::Cuda(0))).reshape([8, 8]);
        for t in [base.shallow_clone(), base.transpose(0, 1), base.narrow(0, 2, 3).narrow(1, 1, 4), base.get(5).get(6)]
        {
            let back = assert_rebuilds(&t);
            assert_eq!(back.device(), Device::Cuda(0));
        }
        let back = rebuild(&base, true).unwrap();
        (&back * 3).sum(Kind::Float).backward();
        assert!(back.grad().equal(&Tensor::full([8, 8], 3.0, (Kind::Float, Device::Cuda(0)))));
        let (storage, _) = parts(&base);
        let err = tensor_from_storage(&storage, FLOAT, &[8, 8], &[8, 1], 1, false).unwrap_err();
        assert!(err.contains("needs 260 bytes of storage from offset 1 but the storage has 256"), "{err}");
    }

    /// Prints what building a tensor over a storage costs here (CPU, and CUDA when there
    /// is a GPU; this profile's optimisation level); asserts nothing about time.
    /// `--ignored --nocapture` shows it.
    #[test]
    #[ignore = "a measurement, run by hand"]
    fn measure_tensor_from_storage() {
        let mut devices = vec![Device::Cpu];
        if tch::Cuda::is_available() {
            devices.push(Device::Cuda(0));
        }
        for device in devices {
            let t = Tensor::arange(4096 * 16, (Kind::Float, device)).reshape([4096, 16]);
            let (storage, ins) = parts(&t);
            let (sizes, strides, offset) = (ins.sizes.clone(), ins.strides.clone(), ins.meta.storage_offset);
            // The cost of the timing loop itself.
            let nothing = p50_ns(|| {
                std::hint::black_box(&storage);
            });
            let direct = p50_ns(|| {
                let v = tensor_from_storage(&storage, FLOAT, &sizes, &strides, offset, false).unwrap();
                drop(std::hint::black_box(v));
            });
            // What st_tensor_from_storage did before: at::empty, then set_ (through tch).
            let empty_and_set = p50_ns(|| {
                let mut v = Tensor::empty([0], (Kind::Float, device));
                let _ = v.set_source_tensor_storage_offset_(&t, offset, sizes.as_slice(), strides.as_slice());
                drop(std::hint::black_box(v));
            });
            println!(
                "{device:?}: p50 per call: nothing {nothing:.0} ns, tensor_from_storage {direct:.0} ns, \
                 at::empty + set_ (through tch) {empty_and_set:.0} ns"
            );
        }
    }
}
