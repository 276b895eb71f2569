//! The one module with `unsafe` code: the C ABI of `csrc/st_ipc.cpp` and safe wrappers
//! around it.
//!
//! Rules every wrapper keeps:
//! - The C++ side never throws across the boundary: each function returns null on success
//!   or a `malloc`ed message that [`check`] turns into a `String` and frees exactly once.
//! - A `*const C_tensor` passed in comes from a live `tch::Tensor` borrowed for the whole
//!   call, so it is a valid `at::Tensor*` (torch-sys's `C_tensor` is `at::Tensor`).
//! - A `*mut C_tensor` that C++ returns is a fresh `new at::Tensor`, whose ownership moves
//!   into a `tch::Tensor` (which deletes it on drop).
//! - [`OwnedStorage`] owns one heap `c10::Storage` (an atomically refcounted handle to a
//!   `StorageImpl`) and frees it exactly once, on drop.

use std::ffi::{c_char, CStr};
use std::ptr::NonNull;

use tch::Tensor;
use torch_sys::C_tensor;

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

/// Opaque `st_storage` (a heap `c10::Storage`).
#[repr(C)]
pub(crate) struct RawStorage {
    _private: [u8; 0],
}

pub(crate) type ReleaseFn = extern "C" fn(cookie: u64);

extern "C" {
    fn st_free_error(err: *mut c_char);
    fn st_set_release_fn(f: ReleaseFn);
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
    fn st_storage_clone(s: *const RawStorage) -> *mut RawStorage;
    fn st_storage_export(s: *const RawStorage, buf: *mut u8, cap: u64, len: *mut u64, offset: *mut i64) -> *mut c_char;
    fn st_storage_import(
        handle: *const u8,
        len: u64,
        offset: i64,
        nbytes: u64,
        device: i32,
        producer: u64,
        cookie: u64,
        out: *mut *mut RawStorage,
    ) -> *mut c_char;
    fn st_ipc_forget_producer(producer: u64);
    fn st_ipc_mapping_count() -> u64;
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
        // SAFETY: the pointer came from st_tensor_inspect/st_storage_import, is owned by
        // this value alone and is freed only here.
        unsafe { st_storage_free(self.0.as_ptr()) }
    }
}

impl OwnedStorage {
    /// Another owning reference to the same storage (the same memory, one more refcount).
    pub(crate) fn clone_ref(&self) -> OwnedStorage {
        // SAFETY: `self.0` is a live st_storage; st_storage_clone copies the c10::Storage
        // handle (an atomic refcount increment) into a new heap object.
        let raw = unsafe { st_storage_clone(self.0.as_ptr()) };
        // Null only if `new` failed: out of host memory, which Rust treats as fatal too.
        OwnedStorage(
            NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(std::alloc::Layout::new::<usize>())),
        )
    }

    fn from_raw(ptr: *mut RawStorage) -> Result<Self, String> {
        NonNull::new(ptr).map(OwnedStorage).ok_or_else(|| "st_ipc returned no storage".to_string())
    }
}

/// This process's effective user id.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Raises this process's open-file limit to its hard limit (a server holds one socket
/// per client connection); returns the new soft limit.
pub(crate) fn raise_open_files_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid, initialised rlimit for setrlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
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
    pub sizes: Vec<i64>,
    pub strides: Vec<i64>,
    pub storage: Option<OwnedStorage>,
}

pub(crate) fn inspect(t: &Tensor, want_storage: bool) -> Result<Inspected, String> {
    let mut cap = 8usize;
    loop {
        let mut meta = TensorMeta::default();
        let mut sizes = vec![0i64; cap];
        let mut strides = vec![0i64; cap];
        let mut raw: *mut RawStorage = std::ptr::null_mut();
        let storage_out = if want_storage { &mut raw as *mut _ } else { std::ptr::null_mut() };
        // SAFETY: `t` is borrowed for the call, so `as_ptr` is a live at::Tensor*; the
        // buffers hold `cap` elements, the bound passed; `storage_out` is null or valid.
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
        sizes.truncate(ndim);
        strides.truncate(ndim);
        return Ok(Inspected { meta, sizes, strides, storage });
    }
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

/// Maps another process's block and builds a storage of `nbytes` at `offset` in it. When
/// the last reference to that storage goes, the release function gets `cookie` (if non-zero).
pub(crate) fn import_storage(
    handle: &[u8],
    offset: i64,
    nbytes: u64,
    device: i32,
    producer: u64,
    cookie: u64,
) -> Result<OwnedStorage, String> {
    let mut raw: *mut RawStorage = std::ptr::null_mut();
    // SAFETY: `handle` is readable for its length; `raw` is a valid out-pointer. CUDA was
    // initialised by the caller (crate::cuda::require), which getIpcDevPtr needs.
    check(unsafe {
        st_storage_import(handle.as_ptr(), handle.len() as u64, offset, nbytes, device, producer, cookie, &mut raw)
    })?;
    OwnedStorage::from_raw(raw)
}

/// Drops the mapping cache's references to one producer's blocks.
pub(crate) fn forget_producer(producer: u64) {
    // SAFETY: no pointers are passed; the C++ side never throws here.
    unsafe { st_ipc_forget_producer(producer) }
}

/// Mappings of other processes' blocks open in this process.
pub(crate) fn mapping_count() -> u64 {
    // SAFETY: no pointers are passed.
    unsafe { st_ipc_mapping_count() }
}

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
    // SAFETY: `storage` is live; `sizes`/`strides` hold `ndim` elements each; `out` is a
    // valid out-pointer.
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
