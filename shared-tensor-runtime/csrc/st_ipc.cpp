// CUDA IPC through libtorch's caching allocator, behind a small C ABI.
//
// Every function catches every C++ exception and returns it as a heap string that the
// caller frees with st_free_error(); a null return means success. Nothing here panics
// or unwinds into Rust. The Rust side (src/ffi.rs) holds the only `extern "C"` block.
//
// Objects crossing the boundary:
// - `at::Tensor*` is tch's `C_tensor`: tensors we create are `new at::Tensor(..)` and
//   are owned by a `tch::Tensor` (which deletes them through torch-sys).
// - `st_storage*` is a `c10::StorageImpl*` that owns one reference (of the StorageImpl's
//   own atomic refcount, as an intrusive_ptr would): it keeps the memory alive until
//   st_storage_free(). No heap object of ours wraps it, so handing a storage to Rust,
//   cloning and dropping it allocate nothing.

#include "st_ipc.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/StorageImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/util/StringUtil.h>
#include <c10/util/safe_numerics.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>  // driver types only: driver functions are reached through cudaGetDriverEntryPointByVersion
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

// Declared by hand: its header (ATen/cuda/CUDAContext.h) needs CCCL headers that the
// wheel lacks. Referencing a libtorch_cuda symbol from live code is what makes the
// linker keep libtorch_cuda.so as a dependency of every binary that uses this crate
// (rust-lld links with --as-needed; without it CUDA kernels are never registered).
namespace at {
namespace cuda {
int warp_size();
}
}  // namespace at

namespace {

c10::StorageImpl* impl_of(const st_storage* s) {
  return reinterpret_cast<c10::StorageImpl*>(const_cast<st_storage*>(s));
}

// Moves one owning reference out to the caller.
st_storage* hand_out(c10::intrusive_ptr<c10::StorageImpl> p) {
  return reinterpret_cast<st_storage*>(p.release());
}

// A new c10::Storage over `s` (one more reference; `s` keeps its own).
c10::Storage storage_of(const st_storage* s) {
  return c10::Storage(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(impl_of(s)));
}

}  // namespace


namespace {

char* dup_error(const char* msg) {
  size_t n = std::strlen(msg);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, msg, n + 1);
  }
  return out;
}

char* cuda_error(const char* what, cudaError_t err) {
  std::string msg = std::string(what) + ": " + cudaGetErrorString(err);
  return dup_error(msg.c_str());
}

#define ST_TRY try {
#define ST_CATCH                                          \
  }                                                       \
  catch (const c10::Error& e) {                           \
    return dup_error(e.what_without_backtrace());         \
  }                                                       \
  catch (const std::exception& e) {                       \
    return dup_error(e.what());                           \
  }                                                       \
  catch (...) {                                           \
    return dup_error("unknown C++ exception in st_ipc"); \
  }                                                       \
  return nullptr;

// Empty when a view of `size` and `stride` (in elements) starting `offset` elements into a
// storage of `nbytes` bytes, with elements of `itemsize` bytes, lies inside it; otherwise
// a message saying what does not fit, with the numbers. The bounds rule is ATen's
// (checkInBoundsForStorage): a view with no elements fits any storage; otherwise its last
// element, at offset + sum((size_i - 1) * stride_i), must end within the storage.
std::string view_misfit(c10::IntArrayRef size, c10::IntArrayRef stride, int64_t offset, size_t itemsize,
                        size_t nbytes) {
  bool empty = false;
  for (size_t i = 0; i < size.size(); ++i) {
    if (size[i] < 0) {
      return c10::str("size ", size[i], " of dimension ", i, " is negative (sizes ", size, ")");
    }
    if (stride[i] < 0) {
      return c10::str("stride ", stride[i], " of dimension ", i, " is negative (strides ", stride,
                      "); negative strides are not supported");
    }
    empty = empty || size[i] == 0;
  }
  if (offset < 0) {
    return c10::str("storage offset ", offset, " is negative");
  }
  if (empty) {
    return std::string();
  }
  // One past the last element, in elements, then in bytes.
  int64_t end = 0;
  bool overflow = c10::add_overflows(offset, int64_t{1}, &end);
  for (size_t i = 0; i < size.size(); ++i) {
    int64_t span = 0;
    overflow |= c10::mul_overflows(size[i] - 1, stride[i], &span);
    overflow |= c10::add_overflows(end, span, &end);
  }
  uint64_t need = 0;
  overflow |= c10::mul_overflows(static_cast<uint64_t>(end), static_cast<uint64_t>(itemsize), &need);
  if (overflow) {
    return c10::str("the view (sizes ", size, ", strides ", stride, ", ", itemsize,
                    "-byte elements) from offset ", offset,
                    " needs more storage than a 64-bit count can hold");
  }
  if (need > static_cast<uint64_t>(nbytes)) {
    return c10::str("the view (sizes ", size, ", strides ", stride, ", ", itemsize, "-byte elements) needs ",
                    need, " bytes of storage from offset ", offset, " but the storage has ", nbytes);
  }
  return std::string();
}

std::atomic<st_release_fn> g_release_fn{nullptr};

// Set by an atexit handler registered after CUDA's own (atexit handlers run in reverse
// order, so ours runs first): once the process is exiting, deleters make no CUDA calls.
// c10 throws from inside destructors when the CUDA runtime is already gone, which would
// abort the process; leaking a mapping at exit costs nothing.
std::atomic<bool> g_exiting{false};

// Held by st_stream_settled for its CUDA calls (made from background threads) and by
// mark_exiting: once mark_exiting returns, no such call is in flight or can start, so none
// races CUDA's own teardown. Never destroyed. It also queues the release checks of many
// threads in user space: letting them all query the shared default stream at once (an
// atomic count instead of the lock) made a short run of the 16-process load test slower,
// 34 k against 52 k calls/s on one host.
std::mutex& settle_mutex() {
  static std::mutex* m = new std::mutex();
  return *m;
}

void mark_exiting() {
  std::lock_guard<std::mutex> lock(settle_mutex());
  g_exiting.store(true);
}

bool cuda_usable() {
  if (g_exiting.load()) {
    return false;
  }
  int device = 0;
  return cudaGetDevice(&device) != cudaErrorCudartUnloading;
}

struct ImportRegion;

// Context of the DataPtr of every storage we build over an imported region: one per part
// (one per storage of the producer), each holding the region. They live in their
// region (inline for a region of one part, else in its `contexts` array: never one
// allocation per storage): a context's `region` is a reference of the region to itself,
// which the part's deleter moves out and drops, so the region (and its contexts) goes
// with its last part.
struct ImportContext {
  std::shared_ptr<ImportRegion> region;
  uint64_t part;
};

// A region of another process's block that this process imported: the mapping it lies
// in, whom to tell when the last storage over one of its parts goes, and its parts'
// contexts (sized once, never moved).
//
// Made with std::make_shared (one allocation for the region and its count); its destructor
// gives the region back (release_region), so it runs when the last part goes.
struct ImportRegion {
  std::shared_ptr<void> mapping;  // from open_mapping: closes the mapping with the last owner
  uint64_t cookie;
  int device;
  // The contexts of its parts: `only` for a region of one part (most regions: a block
  // that holds one tensor's storage), else the `contexts` array.
  ImportContext only;
  std::unique_ptr<ImportContext[]> contexts;

  ImportRegion(std::shared_ptr<void> m, uint64_t c, int d) : mapping(std::move(m)), cookie(c), device(d) {}
  ImportRegion(const ImportRegion&) = delete;
  ImportRegion& operator=(const ImportRegion&) = delete;
  ~ImportRegion();
};

// Gives a region back when its last part goes (from ~ImportRegion, which is the only
// caller): drops its mapping and contexts, then tells the lender. Never throws.
void release_region(ImportRegion* region) {
  // Only the exit flag here (a cudaGetDevice per storage was a measurable share of
  // dropping a model): nothing below needs a live runtime, and closing the mapping, the
  // one step that does, checks `cuda_usable()` itself.
  if (g_exiting.load()) {
    // Exiting: keep the mapping (the process is going) and tell nobody.
    new std::shared_ptr<void>(std::move(region->mapping));
    return;
  }
  // The producer may reuse this memory as soon as it hears of the release, so the
  // consumer's queued work on it must be finished first (PyTorch's CUDA IPC receiver
  // has the same rule). A leased region hands its stream to the release function,
  // which settles each stream once per batch of releases; a raw import (cookie 0)
  // settles here. Best effort: errors (a dying context) are ignored.
  cudaStream_t stream = nullptr;
  try {
    stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(region->device)).stream();
  } catch (...) {
  }
  uint64_t cookie = region->cookie;
  int device = region->device;
  st_release_fn fn = g_release_fn.load();
  if (cookie == 0 || fn == nullptr) {
    if (cudaStreamQuery(stream) != cudaSuccess) {
      cudaStreamSynchronize(stream);
    }
  }
  // The mapping reference and the contexts go before the lender hears of the release
  // (`only` holds no reference by now: its part's deleter moved it out).
  region->mapping.reset();
  region->contexts.reset();
  if (fn != nullptr && cookie != 0) {
    fn(cookie, device, reinterpret_cast<uint64_t>(stream));
  }
}

ImportRegion::~ImportRegion() { release_region(this); }

void import_deleter(void* raw) {
  auto* ctx = static_cast<ImportContext*>(raw);
  if (g_exiting.load()) {
    return;  // leaked with its region and mapping: the process is going
  }
  // Moved out first: dropping the last reference frees the region and with it `ctx`,
  // which is not touched after this line.
  std::shared_ptr<ImportRegion> last = std::move(ctx->region);
}

// The mappings of other processes' blocks, by IPC handle.
//
// Every open goes through here, never straight to c10's getIpcDevPtr, for two reasons:
// - reuse: repeated transfers of one block open it once per process; the cache keeps a
//   strong reference to the most recently used mappings (LRU-bounded) and a weak one to
//   every mapping still used by a tensor;
// - correctness: c10's own cache asserts ("entry in cache has missing shared_ptr") when a
//   handle is opened while the last tensor over its previous mapping is being dropped on
//   another thread. Here a lookup that finds a mapping being torn down waits until the
//   teardown (which closes c10's mapping under our lock) has finished, then reopens.
//
// Lock rule: no reference that could be the last one is dropped while `mu` is held
// (the deleter takes `mu`); such references are moved out and dropped after unlocking.
struct MappingCache {
  struct Entry {
    std::weak_ptr<void> weak;
    std::shared_ptr<void> strong;  // null once evicted
    uint64_t producer;
    uint64_t last_use;
    uint64_t bytes;  // of the producer's allocation from the mapped address on (the driver's figure)
  };
  std::mutex mu;
  std::condition_variable cv;
  std::unordered_map<std::string, Entry> entries;
  uint64_t clock = 0;
  size_t strong_count = 0;
  static constexpr size_t kMaxStrong = 1024;
};

// Never destroyed: deleters may run during process teardown.
MappingCache& mapping_cache() {
  static MappingCache* cache = new MappingCache();
  return *cache;
}

// Mappings opened by this process since it started (not those found in the cache).
std::atomic<uint64_t> g_mappings_opened{0};

using MemGetAddressRangeFn = CUresult (*)(CUdeviceptr*, size_t*, CUdeviceptr);
using PointerGetAttributeFn = CUresult (*)(void*, CUpointer_attribute, CUdeviceptr);

// A driver function through the runtime's entry-point lookup (no link dependency on
// libcuda); null when the driver does not offer it.
void* driver_function(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess) {
    (void)cudaGetLastError();
    return nullptr;
  }
  return p;
}

// The driver's allocation (base address and size) holding `ptr`: cuMemGetAddressRange, or
// the pointer's range attributes if that fails. Throws when the driver cannot say.
std::pair<CUdeviceptr, size_t> allocation_of(const void* ptr) {
  static auto range = reinterpret_cast<MemGetAddressRangeFn>(driver_function("cuMemGetAddressRange"));
  static auto attribute = reinterpret_cast<PointerGetAttributeFn>(driver_function("cuPointerGetAttribute"));
  const auto dptr = reinterpret_cast<CUdeviceptr>(ptr);
  CUdeviceptr base = 0;
  size_t size = 0;
  CUresult r = CUDA_ERROR_NOT_SUPPORTED;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (range != nullptr) {
      r = range(&base, &size, dptr);
    }
    if (r != CUDA_SUCCESS && attribute != nullptr) {
      CUresult a = attribute(&base, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, dptr);
      CUresult b = attribute(&size, CU_POINTER_ATTRIBUTE_RANGE_SIZE, dptr);
      if (a == CUDA_SUCCESS && b == CUDA_SUCCESS) {
        r = CUDA_SUCCESS;
      }
    }
    if (r != CUDA_ERROR_INVALID_CONTEXT) {
      break;
    }
    // A thread that has made no runtime call yet has no current context: bind the
    // device's primary context (what any runtime call does), then ask again.
    (void)cudaFree(nullptr);
  }
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error(c10::str("the CUDA driver cannot size the allocation at ", ptr,
                                      " (cuMemGetAddressRange / cuPointerGetAttribute: CUresult ",
                                      static_cast<int>(r), "), so a descriptor cannot be checked against it"));
  }
  return {base, size};
}

// Bytes of the allocation holding `ptr` from `ptr` to its end, as the driver knows it:
// what a descriptor's offset + nbytes must fit in.
uint64_t allocation_bytes_from(void* ptr) {
  auto [base, size] = allocation_of(ptr);
  return static_cast<uint64_t>(base + size - reinterpret_cast<CUdeviceptr>(ptr));
}

// The mapping of `handle` and the bytes of the producer's allocation from its start.
std::pair<std::shared_ptr<void>, uint64_t> open_mapping(std::string_view handle, uint64_t producer,
                                                        c10::DeviceIndex device) {
  MappingCache& c = mapping_cache();
  std::vector<std::shared_ptr<void>> evicted;  // dropped after unlocking
  std::shared_ptr<void> result;
  uint64_t bytes = 0;
  {
    std::unique_lock<std::mutex> lock(c.mu);
    // The lookup key, in a buffer this thread reuses: no allocation per region on a hit
    // (C++17's unordered_map cannot look a std::string key up by a string_view).
    thread_local std::string key;
    key.assign(handle.data(), handle.size());
    for (;;) {
      auto it = c.entries.find(key);
      if (it == c.entries.end()) {
        break;
      }
      result = it->second.weak.lock();
      if (result) {
        bytes = it->second.bytes;
        it->second.last_use = ++c.clock;
        if (!it->second.strong) {
          it->second.strong = result;
          ++c.strong_count;
        }
        break;
      }
      // Its last tensor is going: wait for the teardown to close it.
      c.cv.wait(lock);
    }
    if (!result) {
      // Opening maps into the current device's context; a cached mapping needs no guard.
      c10::cuda::CUDAGuard guard(device);
      auto c10_mapping = std::make_unique<std::shared_ptr<void>>(
          c10::cuda::CUDACachingAllocator::getIpcDevPtr(std::string(handle)));
      g_mappings_opened.fetch_add(1);
      void* ptr = c10_mapping->get();
      // Asked once per mapping; a failure drops the mapping (c10 closes it).
      bytes = allocation_bytes_from(ptr);
      result = std::shared_ptr<void>(ptr, [mapping = c10_mapping.release(), key = std::string(handle)](void*) {
        MappingCache& cache = mapping_cache();
        std::unique_lock<std::mutex> l(cache.mu);
        auto found = cache.entries.find(key);
        if (found != cache.entries.end() && found->second.weak.expired()) {
          cache.entries.erase(found);
        }
        // Closing under our lock: no open of this handle can interleave with it.
        if (cuda_usable()) {
          delete mapping;
        }
        l.unlock();
        cache.cv.notify_all();
      });
      c.entries[std::string(handle)] = MappingCache::Entry{result, result, producer, ++c.clock, bytes};
      ++c.strong_count;
    }
    while (c.strong_count > MappingCache::kMaxStrong) {
      auto oldest = c.entries.end();
      for (auto it = c.entries.begin(); it != c.entries.end(); ++it) {
        if (it->second.strong && (oldest == c.entries.end() || it->second.last_use < oldest->second.last_use)) {
          oldest = it;
        }
      }
      if (oldest == c.entries.end()) {
        break;
      }
      evicted.push_back(std::move(oldest->second.strong));
      --c.strong_count;
    }
  }
  return {std::move(result), bytes};
}

// One interprocess event per CUDA stream that has exported: re-recording the event of
// a stream covers all earlier work on that stream, so a consumer that waits on a later
// record than "its own" only waits longer, never too short.
struct ExportEvent {
  cudaEvent_t event;
  cudaIpcEventHandle_t handle;
};
std::mutex g_export_events_mu;
std::map<std::pair<int, cudaStream_t>, ExportEvent> g_export_events;

// Opened interprocess events of other processes, by handle bytes.
std::mutex g_import_events_mu;
std::unordered_map<std::string, cudaEvent_t> g_import_events;

}  // namespace

extern "C" {

void st_free_error(char* err) { std::free(err); }

void st_set_release_fn(st_release_fn fn) { g_release_fn.store(fn); }

// Initialises CUDA in this process (getIpcDevPtr crashes in a process that has not).
const char* st_init(st_init_info* info) {
  ST_TRY
  info->device_count = static_cast<int32_t>(c10::cuda::device_count());
  info->warp_size = 0;
  if (info->device_count > 0) {
    at::globalContext().lazyInitDevice(c10::DeviceType::CUDA);
    info->warp_size = at::cuda::warp_size();
    // After CUDA's initialisation, so that this handler runs before CUDA's teardown.
    std::atexit(mark_exiting);
  }
  ST_CATCH
}

const char* st_current_device(int32_t* out) {
  ST_TRY
  *out = static_cast<int32_t>(c10::cuda::current_device());
  ST_CATCH
}

const char* st_device_uuid(int32_t device, uint8_t out[16]) {
  ST_TRY
  cudaDeviceProp prop;
  cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    return cuda_error("cudaGetDeviceProperties", err);
  }
  std::memcpy(out, prop.uuid.bytes, 16);
  ST_CATCH
}

// Reads a tensor's device, dtype, view and storage. `sizes`/`strides` have room for
// `cap` dimensions; `meta->ndim` tells how many there are (the caller retries if more).
// When `storage_out` is not null it receives an owning reference to the storage.
const char* st_tensor_inspect(const st_tensor* t, st_tensor_meta* meta, int64_t* sizes,
                              int64_t* strides, int32_t cap, st_storage** storage_out) {
  ST_TRY
  std::memset(meta, 0, sizeof(*meta));
  if (t == nullptr || !t->defined()) {
    return nullptr;
  }
  meta->defined = 1;
  meta->device_type = static_cast<int32_t>(t->device().type());
  meta->device_index = static_cast<int32_t>(t->device().index());
  meta->scalar_type = static_cast<int32_t>(t->scalar_type());
  meta->requires_grad = t->requires_grad() ? 1 : 0;
  meta->ndim = static_cast<int32_t>(t->dim());
  if (meta->ndim <= cap) {
    for (int64_t i = 0; i < t->dim(); ++i) {
      sizes[i] = t->size(i);
      strides[i] = t->stride(i);
    }
  }
  if (!t->has_storage()) {
    return dup_error("tensor has no storage (sparse, nested or functional tensors cannot be shared)");
  }
  meta->storage_offset = t->storage_offset();
  const c10::Storage& storage = t->storage();
  meta->storage_base = reinterpret_cast<uint64_t>(storage.data());
  meta->storage_nbytes = static_cast<uint64_t>(storage.nbytes());
  const c10::DataPtr& dp = storage.data_ptr();
  if (dp.get_deleter() == &import_deleter) {
    const auto* ctx = static_cast<const ImportContext*>(dp.get_context());
    meta->import_cookie = ctx->region->cookie;
    meta->import_part = ctx->part;
  }
  if (storage_out != nullptr) {
    *storage_out = hand_out(c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(storage.unsafeGetStorageImpl()));
  }
  ST_CATCH
}

// Once the process is exiting, a storage may be the last reference to CUDA memory whose
// free would run into CUDA's teardown (a background thread dropping a storage as exit
// begins): it is leaked instead, which costs nothing at exit.
void st_storage_free(st_storage* s) {
  if (g_exiting.load()) {
    return;
  }
  // Gives the reference back (the last one frees the StorageImpl). Never throws.
  c10::intrusive_ptr<c10::StorageImpl>::reclaim(impl_of(s));
}

// One more owning reference to the storage (the caller then owns the same pointer
// twice). Never throws, never allocates.
void st_storage_incref(const st_storage* s) { c10::raw::intrusive_ptr::incref(impl_of(s)); }

// The start address and size of the driver allocation (the cudaMalloc segment) holding
// the storage's first byte; 0 and 0 for an empty storage. Storages of one allocation share its IPC
// handle, so a sender asks this first and exports each allocation's handle once.
const char* st_storage_allocation(const st_storage* s, uint64_t* base, uint64_t* size) {
  ST_TRY
  *base = 0;
  *size = 0;
  const c10::StorageImpl& storage = *impl_of(s);
  if (storage.device().type() != c10::DeviceType::CUDA || storage.data() == nullptr) {
    return nullptr;
  }
  c10::cuda::CUDAGuard guard(storage.device().index());
  auto range = allocation_of(storage.data());
  *base = static_cast<uint64_t>(range.first);
  *size = static_cast<uint64_t>(range.second);
  ST_CATCH
}

// The IPC handle of the caching-allocator block holding the storage, and the byte
// offset of the storage in that block. `buf` has room for `cap` bytes; `*len` is the
// handle's length (the caller retries with a larger buffer if it exceeds `cap`).
const char* st_storage_export(const st_storage* s, uint8_t* buf, uint64_t cap, uint64_t* len,
                              int64_t* offset) {
  ST_TRY
  const c10::StorageImpl& storage = *impl_of(s);
  if (storage.device().type() != c10::DeviceType::CUDA) {
    return dup_error("storage is not on a CUDA device");
  }
  if (storage.nbytes() == 0 || storage.data() == nullptr) {
    *len = 0;
    *offset = 0;
    return nullptr;
  }
  c10::cuda::CUDAGuard guard(storage.device().index());
  auto shared = c10::cuda::CUDACachingAllocator::shareIpcHandle(
      const_cast<void*>(storage.data()));
  *len = shared.handle.size();
  *offset = static_cast<int64_t>(shared.offset);
  if (shared.handle.size() <= cap) {
    std::memcpy(buf, shared.handle.data(), shared.handle.size());
  }
  ST_CATCH
}

// Maps other processes' blocks and builds one storage per part of the `n_regions`
// regions, for a whole message at once: a block named by several regions is looked up and
// mapped once, and each region is one lease: its storages (one per storage of the
// producer, `n_parts` in all) share one context that gives the region back (the current
// stream and its `cookie` to the release function, or a stream sync for cookie 0) when
// the last of them goes.
//
// Before any storage is built, every region is checked against the real allocation:
// offset not negative and offset + nbytes within the producer's allocation as the driver
// sizes the mapped block; and every part against its region. On a region's misfit,
// `*failed` is the region's index and `*alloc_bytes` the allocation's size (so the caller
// can name both); on any other error tied to a region `*failed` is its index and
// `*alloc_bytes` is UINT64_MAX. Nothing is returned in `out` on error.
const char* st_regions_import(const st_import_spec* regions, uint64_t n_regions, const st_part_spec* parts,
                              uint64_t n_parts, st_storage** out, uint64_t* failed, uint64_t* alloc_bytes) {
  std::vector<st_storage*> built;
  uint64_t at = 0;
  *failed = UINT64_MAX;
  *alloc_bytes = UINT64_MAX;
  try {
    std::vector<std::shared_ptr<ImportRegion>> opened(n_regions);
    for (at = 0; at < n_regions; ++at) {
      const st_import_spec& sp = regions[at];
      std::shared_ptr<void> mapping;
      if (sp.handle_len != 0) {
        // Regions of one block (one handle) share a mapping through the mapping cache: the
        // first one's mapping is held in `opened`, so a later one finds it there.
        std::string_view h(reinterpret_cast<const char*>(sp.handle), sp.handle_len);
        auto [mapped, bytes] = open_mapping(h, sp.producer, static_cast<c10::DeviceIndex>(sp.device));
        uint64_t end = 0;
        if (sp.offset < 0 || c10::add_overflows(static_cast<uint64_t>(sp.offset), sp.nbytes, &end) || end > bytes) {
          *failed = at;
          *alloc_bytes = bytes;
          return dup_error("the storage lies outside the producer's allocation");
        }
        mapping = std::move(mapped);
      } else if (sp.nbytes != 0) {
        *failed = at;
        return dup_error("a region with bytes but no IPC handle");
      }
      // Its deleter tells the producer: until every storage is built (and Rust has
      // registered the cookie), a region dropped on error tells nobody.
      opened[at] = std::make_shared<ImportRegion>(std::move(mapping), sp.cookie, sp.device);
    }
    at = UINT64_MAX;
    // Each region's contexts: its `only` one, or one array sized by its part count.
    std::vector<uint64_t> used(n_regions, 0);
    for (uint64_t k = 0; k < n_parts; ++k) {
      if (parts[k].region < n_regions) {
        ++used[parts[k].region];
      }
    }
    for (uint64_t r = 0; r < n_regions; ++r) {
      if (used[r] > 1) {
        opened[r]->contexts.reset(new ImportContext[used[r]]);
      }
    }
    std::vector<uint64_t> next(n_regions, 0);
    built.reserve(n_parts);
    for (uint64_t k = 0; k < n_parts; ++k) {
      const st_part_spec& part = parts[k];
      uint64_t end = 0;
      if (part.region >= n_regions || c10::add_overflows(part.offset, part.nbytes, &end) ||
          end > static_cast<uint64_t>(regions[part.region].nbytes)) {
        throw std::runtime_error(c10::str("part ", k, " (region ", part.region, ", offset ", part.offset,
                                          ", nbytes ", part.nbytes, ") lies outside its region"));
      }
      const st_import_spec& sp = regions[part.region];
      c10::Device dev(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(sp.device));
      const std::shared_ptr<ImportRegion>& region = opened[part.region];
      void* ptr = region->mapping ? static_cast<char*>(region->mapping.get()) + sp.offset + part.offset : nullptr;
      ImportContext* ctx = used[part.region] == 1 ? &region->only : &region->contexts[next[part.region]++];
      ctx->region = region;
      ctx->part = part.index;
      c10::DataPtr data_ptr(ptr, ctx, &import_deleter, dev);
      auto impl = c10::make_intrusive<c10::StorageImpl>(c10::StorageImpl::use_byte_size_t(),
                                                        static_cast<size_t>(part.nbytes), std::move(data_ptr),
                                                        nullptr, false);
      impl->set_received_cuda(true);
      built.push_back(hand_out(std::move(impl)));
    }
    std::copy(built.begin(), built.end(), out);
    return nullptr;
  } catch (const c10::Error& e) {
    *failed = at;
    for (st_storage* s : built) st_storage_free(s);
    return dup_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    *failed = at;
    for (st_storage* s : built) st_storage_free(s);
    return dup_error(e.what());
  } catch (...) {
    *failed = at;
    for (st_storage* s : built) st_storage_free(s);
    return dup_error("unknown C++ exception in st_ipc");
  }
}

// A new tensor over a storage, built directly the way ATen's own from_blob (TensorMaker)
// builds one: a TensorImpl over the storage, then its sizes, strides and offset. This
// replaces `at::empty({0}) + set_()`, two trips through the dispatcher (~2 us a tensor).
//
// It checks everything `set_` checked, and more: the dtype is a real, non-quantized one,
// the storage is on CPU or CUDA, no size, stride or offset is negative, and a non-empty
// view lies inside the storage (computed without overflow). Unlike `set_`, a view too
// large for a resizable (CPU) storage is refused rather than growing the storage; an
// imported CUDA storage is never resizable, so `set_` refused it too.
const char* st_tensor_from_storage(const st_storage* s, int32_t scalar_type, const int64_t* sizes,
                                   const int64_t* strides, int32_t ndim, int64_t storage_offset,
                                   int32_t requires_grad, st_tensor** out) {
  ST_TRY
  if (s == nullptr) {
    return dup_error("no storage to build a tensor over");
  }
  if (ndim < 0) {
    return dup_error(c10::str("invalid dimension count ", ndim).c_str());
  }
  if (ndim > 0 && (sizes == nullptr || strides == nullptr)) {
    return dup_error("no sizes or strides for a tensor of one or more dimensions");
  }
  // Before any cast to ScalarType: TypeMeta::fromScalarType indexes a table with it.
  if (scalar_type < 0 || scalar_type >= static_cast<int32_t>(c10::ScalarType::NumOptions)) {
    return dup_error(c10::str("unknown scalar type ", scalar_type).c_str());
  }
  const auto st = static_cast<c10::ScalarType>(scalar_type);
  if (st == c10::ScalarType::Undefined || c10::isQIntType(st)) {
    // A plain TensorImpl cannot hold these (quantized tensors need a QTensorImpl).
    return dup_error(c10::str("scalar type ", st, " cannot be viewed over a storage").c_str());
  }
  c10::Storage storage = storage_of(s);
  // The backend key at::empty gives a dense tensor on that device; the TensorImpl
  // constructor adds the autograd, ADInplaceOrView and autocast keys, as it does there.
  c10::DispatchKey backend;
  switch (storage.device().type()) {
    case c10::DeviceType::CPU:
      backend = c10::DispatchKey::CPU;
      break;
    case c10::DeviceType::CUDA:
      backend = c10::DispatchKey::CUDA;
      break;
    default:
      return dup_error(
          c10::str("a storage on ", storage.device(), " (only CPU and CUDA storages are supported)").c_str());
  }
  const c10::IntArrayRef size(sizes, static_cast<size_t>(ndim));
  const c10::IntArrayRef stride(strides, static_cast<size_t>(ndim));
  const caffe2::TypeMeta dtype = caffe2::TypeMeta::fromScalarType(st);
  std::string misfit = view_misfit(size, stride, storage_offset, dtype.itemsize(), storage.nbytes());
  if (!misfit.empty()) {
    return dup_error(misfit.c_str());
  }
  at::Tensor t =
      at::detail::make_tensor<c10::TensorImpl>(std::move(storage), c10::DispatchKeySet(backend), dtype);
  // Sets sizes, strides (all non-negative, so kept as given) and offset, then recomputes
  // numel and the contiguity flags.
  t.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride, storage_offset);
  if (requires_grad != 0) {
    // Throws (an error return) for dtypes that cannot require grad, as before.
    t.set_requires_grad(true);
  }
  *out = new at::Tensor(std::move(t));
  ST_CATCH
}

// Drops the cache's references to a producer's mappings (its connection closed); each
// closes when its last tensor goes.
void st_ipc_forget_producer(uint64_t producer) {
  MappingCache& c = mapping_cache();
  std::vector<std::shared_ptr<void>> dropped;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    for (auto& kv : c.entries) {
      if (kv.second.producer == producer && kv.second.strong) {
        dropped.push_back(std::move(kv.second.strong));
        --c.strong_count;
      }
    }
  }
}

// Mappings this process has opened since it started (cache hits not counted).
uint64_t st_ipc_mappings_opened() { return g_mappings_opened.load(); }

// Mappings open in this process (held by the cache or by tensors).
uint64_t st_ipc_mapping_count() {
  MappingCache& c = mapping_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<uint64_t>(c.entries.size());
}

// Whether this thread's current stream on `device` has finished all its work.
const char* st_stream_idle(int32_t device, int32_t* idle) {
  ST_TRY
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  cudaError_t err = cudaStreamQuery(stream);
  if (err == cudaSuccess) {
    *idle = 1;
  } else if (err == cudaErrorNotReady) {
    *idle = 0;
  } else {
    return cuda_error("cudaStreamQuery", err);
  }
  ST_CATCH
}

// Whether `stream` (a cudaStream_t as an integer, on `device`) has finished its queued
// work. Never waits (callers poll), so the lock it takes against CUDA's teardown is held
// only for a query. Best effort for the release path: an error (a dying context, a
// stream destroyed since) counts as finished.
int32_t st_stream_settled(int32_t device, uint64_t stream) {
  std::lock_guard<std::mutex> lock(settle_mutex());
  if (!cuda_usable()) {
    return 1;
  }
  try {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    cudaError_t err = cudaStreamQuery(reinterpret_cast<cudaStream_t>(stream));
    if (err == cudaErrorNotReady) {
      return 0;
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();  // not an error of whoever calls CUDA next on this thread
    }
  } catch (...) {
  }
  return 1;
}

// Records this thread's current stream on `device` in an interprocess event and gives
// its handle (64 bytes).
const char* st_event_record(int32_t device, uint8_t out[64]) {
  ST_TRY
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  std::lock_guard<std::mutex> lock(g_export_events_mu);
  auto key = std::make_pair(static_cast<int>(device), stream);
  auto it = g_export_events.find(key);
  if (it == g_export_events.end()) {
    ExportEvent ev{};
    cudaError_t err =
        cudaEventCreateWithFlags(&ev.event, cudaEventDisableTiming | cudaEventInterprocess);
    if (err != cudaSuccess) {
      return cuda_error("cudaEventCreateWithFlags", err);
    }
    err = cudaIpcGetEventHandle(&ev.handle, ev.event);
    if (err != cudaSuccess) {
      cudaEventDestroy(ev.event);
      return cuda_error("cudaIpcGetEventHandle", err);
    }
    it = g_export_events.emplace(key, ev).first;
  }
  cudaError_t err = cudaEventRecord(it->second.event, stream);
  if (err != cudaSuccess) {
    return cuda_error("cudaEventRecord", err);
  }
  static_assert(sizeof(cudaIpcEventHandle_t) == 64, "IPC event handles are 64 bytes");
  std::memcpy(out, &it->second.handle, 64);
  ST_CATCH
}

// Makes this thread's current stream on `device` wait for another process's event.
const char* st_event_wait(int32_t device, const uint8_t handle[64]) {
  ST_TRY
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaEvent_t event = nullptr;
  {
    std::string key(reinterpret_cast<const char*>(handle), 64);
    std::lock_guard<std::mutex> lock(g_import_events_mu);
    auto it = g_import_events.find(key);
    if (it == g_import_events.end()) {
      cudaIpcEventHandle_t h;
      std::memcpy(&h, handle, 64);
      cudaError_t err = cudaIpcOpenEventHandle(&event, h);
      if (err != cudaSuccess) {
        return cuda_error("cudaIpcOpenEventHandle", err);
      }
      g_import_events.emplace(std::move(key), event);
    } else {
      event = it->second;
    }
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  cudaError_t err = cudaStreamWaitEvent(stream, event, 0);
  if (err != cudaSuccess) {
    return cuda_error("cudaStreamWaitEvent", err);
  }
  ST_CATCH
}

const char* st_synchronize(int32_t device) {
  ST_TRY
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    return cuda_error("cudaDeviceSynchronize", err);
  }
  ST_CATCH
}

// Waits for this thread's current stream on `device` (not the whole device).
const char* st_stream_synchronize(int32_t device) {
  ST_TRY
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(device)).stream();
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err != cudaSuccess) {
    return cuda_error("cudaStreamSynchronize", err);
  }
  ST_CATCH
}

const char* st_memory_stats(int32_t device, st_alloc_stats* out) {
  ST_TRY
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
  auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  out->allocated_bytes = static_cast<uint64_t>(stats.allocated_bytes[agg].current);
  out->reserved_bytes = static_cast<uint64_t>(stats.reserved_bytes[agg].current);
  size_t free_b = 0, total_b = 0;
  cudaError_t err = cudaMemGetInfo(&free_b, &total_b);
  if (err != cudaSuccess) {
    return cuda_error("cudaMemGetInfo", err);
  }
  out->free_bytes = free_b;
  out->total_bytes = total_b;
  ST_CATCH
}

const char* st_empty_cache() {
  ST_TRY
  c10::cuda::CUDACachingAllocator::emptyCache();
  ST_CATCH
}

}  // extern "C"
