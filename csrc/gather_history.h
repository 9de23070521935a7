// Shared declarations of the smartfrz_ext ops (CPU, Meta and CUDA kernels, and _C's build_info).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace smartfrz {

// Source dtypes the kernels read, as stored in the CUDA kernel's device table.
enum SourceDtype : int64_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Checks every argument of gather_history that can be checked without reading device memory
// (dtypes, shapes, devices, contiguity, the source dtypes); TORCH_CHECK failures name the
// argument. Returns nothing; the data-dependent checks (rows, ids and offsets in range) happen
// in the kernels.
void check_gather_history_args(const std::vector<at::Tensor>& sources, const at::Tensor& source_ids,
                               const at::Tensor& offsets, const at::Tensor& rows,
                               const at::Tensor& cursor, const at::Tensor& history);

// Element-count span of a strided tensor: 1 + sum((size - 1) * stride), 0 when empty.
int64_t strided_span(const at::Tensor& t);

// Names ("smartfrz_ext::gather_history", ...) of the ops of namespace smartfrz_ext that the
// dispatcher knows about.
std::vector<std::string> registered_ops();

}  // namespace smartfrz
