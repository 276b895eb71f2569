// The C ABI between the Rust runtime (src/ffi/torch.rs) and st_ipc.cpp: the one
// declaration of every type and function that crosses it. st_ipc.cpp includes it, so the
// compiler checks each definition against its declaration here; the Rust side declares
// the same items by hand and asserts, at compile time, the sizes and field offsets that
// are asserted below (keep the two lists equal).
//
// Conventions: a `const char*` return is null on success, else a malloc'ed message the
// caller frees with st_free_error(). An `st_tensor*` is tch's C_tensor (`at::Tensor*`);
// an `st_storage*` is a `c10::StorageImpl*` owning one reference (never a defined type).

#ifndef SHARED_TENSOR_ST_IPC_H
#define SHARED_TENSOR_ST_IPC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
namespace at {
class Tensor;
}
typedef at::Tensor st_tensor;
extern "C" {
#else
typedef struct st_tensor st_tensor;
#endif

typedef struct st_storage st_storage;

struct st_init_info {
  int32_t device_count;
  int32_t warp_size;
};

struct st_tensor_meta {
  int32_t defined;
  int32_t device_type;  // c10::DeviceType as int (0 = CPU, 1 = CUDA)
  int32_t device_index;
  int32_t scalar_type;  // c10::ScalarType as int
  int32_t requires_grad;
  int32_t ndim;
  int64_t storage_offset;  // in elements
  uint64_t storage_base;   // address of the storage's first byte (0 when empty)
  uint64_t storage_nbytes;
  uint64_t import_cookie;  // non-zero when the storage was created by st_regions_import
  uint64_t import_part;    // then: the storage's index among its region's parts
};

struct st_alloc_stats {
  uint64_t allocated_bytes;
  uint64_t reserved_bytes;
  uint64_t free_bytes;   // cudaMemGetInfo
  uint64_t total_bytes;  // cudaMemGetInfo
};

// One region to import: [offset, offset + nbytes) of the block behind `handle`, mapped once
// and released (under `cookie`) when the last storage over one of its parts goes.
struct st_import_spec {
  const uint8_t* handle;
  uint64_t handle_len;
  int64_t offset;
  uint64_t nbytes;
  int32_t device;
  uint64_t producer;
  uint64_t cookie;
};

// One storage to build over a region: [offset, offset + nbytes) of region `region`; `index`
// is its place among that region's parts (what the producer's lease knows it by).
struct st_part_spec {
  uint64_t region;
  uint64_t offset;
  uint64_t nbytes;
  uint64_t index;
};

// Called when the last reference to an imported storage goes, with the stream the
// dropping thread had current on the storage's device (as an integer): the lender may
// reuse the memory only once that stream's queued work is done, which the receiver of
// this call sees to (st_stream_settled) before it tells the lender.
typedef void (*st_release_fn)(uint64_t cookie, int32_t device, uint64_t stream);


// Sizes and field offsets: the Rust side asserts the same numbers (src/ffi/torch.rs).
#ifdef __cplusplus
#define ST_ASSERT(cond, msg) static_assert(cond, msg)
#else
#define ST_ASSERT(cond, msg) _Static_assert(cond, msg)
#endif
ST_ASSERT(sizeof(struct st_init_info) == 8, "st_init_info layout");
ST_ASSERT(sizeof(struct st_tensor_meta) == 64, "st_tensor_meta layout");
ST_ASSERT(offsetof(struct st_tensor_meta, ndim) == 20, "st_tensor_meta.ndim");
ST_ASSERT(offsetof(struct st_tensor_meta, storage_offset) == 24, "st_tensor_meta.storage_offset");
ST_ASSERT(offsetof(struct st_tensor_meta, import_part) == 56, "st_tensor_meta.import_part");
ST_ASSERT(sizeof(struct st_alloc_stats) == 32, "st_alloc_stats layout");
ST_ASSERT(sizeof(struct st_import_spec) == 56, "st_import_spec layout");
ST_ASSERT(offsetof(struct st_import_spec, device) == 32, "st_import_spec.device");
ST_ASSERT(offsetof(struct st_import_spec, producer) == 40, "st_import_spec.producer");
ST_ASSERT(sizeof(struct st_part_spec) == 32, "st_part_spec layout");
#undef ST_ASSERT

void st_free_error(char* err);
void st_set_release_fn(st_release_fn fn);
int32_t st_stream_settled(int32_t device, uint64_t stream);
const char* st_init(struct st_init_info* info);
const char* st_current_device(int32_t* out);
const char* st_device_uuid(int32_t device, uint8_t out[16]);
const char* st_tensor_inspect(const st_tensor* t, struct st_tensor_meta* meta, int64_t* sizes, int64_t* strides,
                              int32_t cap, st_storage** storage_out);
void st_storage_free(st_storage* s);
void st_storage_incref(const st_storage* s);
const char* st_storage_allocation(const st_storage* s, uint64_t* base, uint64_t* size);
const char* st_storage_export(const st_storage* s, uint8_t* buf, uint64_t cap, uint64_t* len, int64_t* offset);
const char* st_regions_import(const struct st_import_spec* regions, uint64_t n_regions,
                              const struct st_part_spec* parts, uint64_t n_parts, st_storage** out,
                              uint64_t* failed, uint64_t* alloc_bytes);
void st_ipc_forget_producer(uint64_t producer);
uint64_t st_ipc_mapping_count(void);
uint64_t st_ipc_mappings_opened(void);
const char* st_tensor_from_storage(const st_storage* s, int32_t scalar_type, const int64_t* sizes,
                                   const int64_t* strides, int32_t ndim, int64_t storage_offset,
                                   int32_t requires_grad, st_tensor** out);
const char* st_stream_idle(int32_t device, int32_t* idle);
const char* st_event_record(int32_t device, uint8_t out[64]);
const char* st_event_wait(int32_t device, const uint8_t handle[64]);
const char* st_synchronize(int32_t device);
const char* st_stream_synchronize(int32_t device);
const char* st_memory_stats(int32_t device, struct st_alloc_stats* out);
const char* st_empty_cache(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // SHARED_TENSOR_ST_IPC_H
