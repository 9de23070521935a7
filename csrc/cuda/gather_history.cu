// CUDA kernel of smartfrz_ext::gather_history (specification: reference.py::gather_history_ref).
//
// One launch for all rows: a grid-stride loop over the R x K outputs, consecutive threads on
// consecutive k (coalesced reads of source_ids/offsets and writes of history). The sources are
// reached through a small device table [3, S] of int64 (data pointer, dtype code, span in
// elements), built in pinned host memory and copied asynchronously on the current stream.
// The cursor is read on the device when it lives there: nothing here synchronises with the host.
// Out-of-range rows, source ids and offsets trip a device-side assert (like torch's index
// kernels), since checking them on the host would need a synchronisation.

#include "../gather_history.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

namespace smartfrz {
namespace {

constexpr const char* kOp = "smartfrz_ext::gather_history";
constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

__device__ __forceinline__ float load_as_float(int64_t ptr, int64_t dtype, int64_t offset) {
  switch (dtype) {
    case kFloat32:
      return __ldg(reinterpret_cast<const float*>(ptr) + offset);
    case kFloat16:
      return __half2float(__ldg(reinterpret_cast<const __half*>(ptr) + offset));
    case kBFloat16: {
      // bfloat16 -> float is exact: the 16 bits become the high half of the float.
      const uint32_t bits = __ldg(reinterpret_cast<const unsigned short*>(ptr) + offset);
      return __uint_as_float(bits << 16);
    }
    case kFloat64:
      return static_cast<float>(__ldg(reinterpret_cast<const double*>(ptr) + offset));
    default:
      return 0.0f;
  }
}

__global__ void gather_history_kernel(const int64_t* __restrict__ table, int64_t num_sources,
                                      const int32_t* __restrict__ source_ids,
                                      const int64_t* __restrict__ offsets,
                                      const int64_t* __restrict__ rows, int64_t num_rows,
                                      const int64_t* __restrict__ cursor_ptr, int64_t cursor_value,
                                      int64_t num_units, int64_t num_slots, int64_t k,
                                      float* __restrict__ history) {
  const int64_t c = cursor_ptr != nullptr ? *cursor_ptr : cursor_value;
  int64_t slot = c % num_slots;
  if (slot < 0) {
    slot += num_slots;  // Python's %, as in the reference
  }
  const int64_t total = num_rows * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / k;
    const int64_t j = i - r * k;
    const int64_t unit = rows[r];
    CUDA_KERNEL_ASSERT(unit >= 0 && unit < num_units && "gather_history: row out of range");
    const int64_t src = unit * k + j;
    const int32_t sid = source_ids[src];
    float value = 0.0f;
    if (sid != -1) {
      CUDA_KERNEL_ASSERT(sid >= 0 && sid < num_sources && "gather_history: source id out of range");
      const int64_t off = offsets[src];
      CUDA_KERNEL_ASSERT(off >= 0 && off < table[2 * num_sources + sid] &&
                         "gather_history: offset out of range");
      value = load_as_float(table[sid], table[num_sources + sid], off);
    }
    history[(unit * num_slots + slot) * k + j] = value;
  }
}

SourceDtype dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, kOp, ": unsupported source dtype ", t);
  }
}

void gather_history_cuda(const std::vector<at::Tensor>& sources, const at::Tensor& source_ids,
                         const at::Tensor& offsets, const at::Tensor& rows_arg,
                         const at::Tensor& cursor, const at::Tensor& history) {
  check_gather_history_args(sources, source_ids, offsets, rows_arg, cursor, history);
  TORCH_CHECK(history.is_cuda(), kOp, ": the CUDA kernel got history on ", history.device());
  const c10::cuda::CUDAGuard guard(history.device());

  const int64_t num_units = history.size(0);
  const int64_t num_slots = history.size(1);
  const int64_t k = history.size(2);
  const at::Tensor rows = rows_arg.contiguous();
  const int64_t num_rows = rows.numel();
  if (num_rows == 0 || k == 0) {
    return;
  }

  const int64_t num_sources = static_cast<int64_t>(sources.size());
  at::Tensor table;  // [3, S] int64: data pointers, dtype codes, spans
  if (num_sources > 0) {
    at::Tensor host = at::empty({3 * num_sources},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    int64_t* h = host.mutable_data_ptr<int64_t>();
    for (int64_t s = 0; s < num_sources; ++s) {
      h[s] = reinterpret_cast<int64_t>(sources[s].const_data_ptr());
      h[num_sources + s] = dtype_code(sources[s].scalar_type());
      h[2 * num_sources + s] = strided_span(sources[s]);
    }
    // Pinned + non_blocking: an async copy on the current stream; the caching host allocator
    // keeps `host` alive until the copy has run.
    table = host.to(at::TensorOptions().device(history.device()), /*non_blocking=*/true);
  }

  const int64_t* cursor_ptr = cursor.is_cuda() ? cursor.const_data_ptr<int64_t>() : nullptr;
  const int64_t cursor_value = cursor.is_cuda() ? 0 : *cursor.const_data_ptr<int64_t>();

  const int64_t total = num_rows * k;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxBlocks);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  gather_history_kernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      num_sources > 0 ? table.const_data_ptr<int64_t>() : nullptr, num_sources,
      source_ids.const_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(),
      rows.const_data_ptr<int64_t>(), num_rows, cursor_ptr, cursor_value, num_units, num_slots, k,
      history.mutable_data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace smartfrz

TORCH_LIBRARY_IMPL(smartfrz_ext, CUDA, m) {
  m.impl("gather_history", &smartfrz::gather_history_cuda);
}
