// smartfrz_ext::gather_history: schema, argument checks, and the CPU and Meta kernels.
//
// Specification: smartfrz_fast/ops/reference.py::gather_history_ref. For every r in rows and
// every k < K:
//   history[rows[r], cursor % T, k] = float(sources[source_ids[rows[r], k]] at offsets[rows[r], k])
// or 0.0 where source_ids[rows[r], k] == -1. Offsets count elements from each source's data_ptr
// with the strides already applied, so non-contiguous sources are read where they live.
// The CUDA kernel is in cuda/gather_history.cu.

#include "gather_history.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>

namespace smartfrz {

namespace {

constexpr const char* kOp = "smartfrz_ext::gather_history";

bool supported_source_dtype(c10::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

SourceDtype source_dtype_code(c10::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, kOp, ": unsupported source dtype ", t);
  }
}

// Python's `c % t` for t > 0 (the reference uses int(cursor) % T).
inline int64_t python_mod(int64_t c, int64_t t) {
  const int64_t m = c % t;
  return m < 0 ? m + t : m;
}

struct CpuSource {
  const void* data;
  SourceDtype dtype;
  int64_t span;
};

inline float load_as_float(const CpuSource& s, int64_t offset) {
  switch (s.dtype) {
    case kFloat32: return static_cast<const float*>(s.data)[offset];
    case kFloat16: return static_cast<float>(static_cast<const c10::Half*>(s.data)[offset]);
    case kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(s.data)[offset]);
    case kFloat64: return static_cast<float>(static_cast<const double*>(s.data)[offset]);
  }
  return 0.0f;  // unreachable: dtypes are checked up front
}

void gather_history_cpu(const std::vector<at::Tensor>& sources, const at::Tensor& source_ids,
                        const at::Tensor& offsets, const at::Tensor& rows_arg,
                        const at::Tensor& cursor, const at::Tensor& history) {
  check_gather_history_args(sources, source_ids, offsets, rows_arg, cursor, history);
  TORCH_CHECK(history.device().is_cpu(), kOp, ": the CPU kernel got history on ", history.device());

  const int64_t num_units = history.size(0);
  const int64_t num_slots = history.size(1);
  const int64_t k = history.size(2);
  const at::Tensor rows = rows_arg.contiguous();
  const int64_t num_rows = rows.numel();
  const int64_t* row_ptr = rows.const_data_ptr<int64_t>();
  for (int64_t r = 0; r < num_rows; ++r) {
    TORCH_CHECK(row_ptr[r] >= 0 && row_ptr[r] < num_units, kOp, ": rows[", r, "] = ", row_ptr[r],
                " is out of range for history with ", num_units, " units");
  }
  if (num_rows == 0 || k == 0) {
    return;
  }
  const int64_t slot = python_mod(*cursor.const_data_ptr<int64_t>(), num_slots);

  const int64_t num_sources = static_cast<int64_t>(sources.size());
  std::vector<CpuSource> table;
  table.reserve(sources.size());
  for (const auto& s : sources) {
    table.push_back({s.const_data_ptr(), source_dtype_code(s.scalar_type()), strided_span(s)});
  }

  const int32_t* ids = source_ids.const_data_ptr<int32_t>();
  const int64_t* offs = offsets.const_data_ptr<int64_t>();
  float* out = history.mutable_data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / k);

  at::parallel_for(0, num_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t unit = row_ptr[r];
      const int32_t* unit_ids = ids + unit * k;
      const int64_t* unit_offs = offs + unit * k;
      float* dst = out + (unit * num_slots + slot) * k;
      for (int64_t j = 0; j < k; ++j) {
        const int32_t sid = unit_ids[j];
        if (sid == -1) {
          dst[j] = 0.0f;
          continue;
        }
        TORCH_CHECK(sid >= 0 && sid < num_sources, kOp, ": source_ids[", unit, ", ", j, "] = ", sid,
                    " is out of range for ", num_sources, " sources (-1 marks a masked position)");
        const CpuSource& src = table[sid];
        const int64_t off = unit_offs[j];
        TORCH_CHECK(off >= 0 && off < src.span, kOp, ": offsets[", unit, ", ", j, "] = ", off,
                    " is out of range for sources[", sid, "], which spans ", src.span, " elements");
        dst[j] = load_as_float(src, off);
      }
    }
  });
}

// Shape and dtype checks only: lets FakeTensor / torch.compile trace the op.
void gather_history_meta(const std::vector<at::Tensor>& sources, const at::Tensor& source_ids,
                         const at::Tensor& offsets, const at::Tensor& rows, const at::Tensor& cursor,
                         const at::Tensor& history) {
  check_gather_history_args(sources, source_ids, offsets, rows, cursor, history);
}

}  // namespace

int64_t strided_span(const at::Tensor& t) {
  if (t.numel() == 0) {
    return 0;
  }
  int64_t span = 1;
  for (int64_t d = 0; d < t.dim(); ++d) {
    span += (t.size(d) - 1) * t.stride(d);
  }
  return span;
}

void check_gather_history_args(const std::vector<at::Tensor>& sources, const at::Tensor& source_ids,
                               const at::Tensor& offsets, const at::Tensor& rows,
                               const at::Tensor& cursor, const at::Tensor& history) {
  TORCH_CHECK(history.defined() && source_ids.defined() && offsets.defined() && rows.defined() &&
                  cursor.defined(),
              kOp, ": got an undefined tensor argument");
  TORCH_CHECK(history.scalar_type() == at::kFloat, kOp, ": history must be float32, got ",
              history.scalar_type());
  TORCH_CHECK(history.dim() == 3, kOp, ": history must be [U, T, K], got shape ", history.sizes());
  TORCH_CHECK(history.size(1) > 0, kOp, ": history has T = 0 slots");
  TORCH_CHECK(history.is_contiguous(), kOp, ": history must be contiguous (strides ",
              history.strides(), ")");
  const auto device = history.device();

  TORCH_CHECK(source_ids.scalar_type() == at::kInt, kOp, ": source_ids must be int32, got ",
              source_ids.scalar_type());
  TORCH_CHECK(source_ids.dim() == 2 && source_ids.size(0) == history.size(0) &&
                  source_ids.size(1) == history.size(2),
              kOp, ": source_ids must be [U, K] = [", history.size(0), ", ", history.size(2),
              "] to match history ", history.sizes(), ", got ", source_ids.sizes());
  TORCH_CHECK(source_ids.is_contiguous(), kOp, ": source_ids must be contiguous");
  TORCH_CHECK(source_ids.device() == device, kOp, ": source_ids is on ", source_ids.device(),
              " but history is on ", device);

  TORCH_CHECK(offsets.scalar_type() == at::kLong, kOp, ": offsets must be int64, got ",
              offsets.scalar_type());
  TORCH_CHECK(offsets.sizes() == source_ids.sizes(), kOp, ": offsets must have the shape of source_ids ",
              source_ids.sizes(), ", got ", offsets.sizes());
  TORCH_CHECK(offsets.is_contiguous(), kOp, ": offsets must be contiguous");
  TORCH_CHECK(offsets.device() == device, kOp, ": offsets is on ", offsets.device(),
              " but history is on ", device);

  TORCH_CHECK(rows.scalar_type() == at::kLong, kOp, ": rows must be int64, got ", rows.scalar_type());
  TORCH_CHECK(rows.dim() == 1, kOp, ": rows must be 1-D, got shape ", rows.sizes());
  TORCH_CHECK(rows.device() == device, kOp, ": rows is on ", rows.device(), " but history is on ",
              device);

  TORCH_CHECK(cursor.scalar_type() == at::kLong, kOp, ": cursor must be int64, got ",
              cursor.scalar_type());
  TORCH_CHECK(cursor.numel() == 1, kOp, ": cursor must hold one value (0-dim), got shape ",
              cursor.sizes());
  TORCH_CHECK(cursor.device() == device || cursor.device().is_cpu(), kOp, ": cursor is on ",
              cursor.device(), " but history is on ", device);

  for (size_t i = 0; i < sources.size(); ++i) {
    const at::Tensor& s = sources[i];
    TORCH_CHECK(s.defined(), kOp, ": sources[", i, "] is undefined");
    TORCH_CHECK(supported_source_dtype(s.scalar_type()), kOp, ": sources[", i, "] has dtype ",
                s.scalar_type(), "; supported: float32, float16, bfloat16, float64");
    TORCH_CHECK(s.device() == device, kOp, ": sources[", i, "] is on ", s.device(),
                " but history is on ", device);
  }
}

std::vector<std::string> registered_ops() {
  std::vector<std::string> names;
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("smartfrz_ext::", 0) == 0) {
      names.push_back(op.overload_name.empty() ? op.name : op.name + "." + op.overload_name);
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace smartfrz

TORCH_LIBRARY(smartfrz_ext, m) {
  m.def(
      "gather_history(Tensor[] sources, Tensor source_ids, Tensor offsets, Tensor rows, "
      "Tensor cursor, Tensor(a!) history) -> ()");
}

TORCH_LIBRARY_IMPL(smartfrz_ext, CPU, m) {
  m.impl("gather_history", &smartfrz::gather_history_cpu);
}

TORCH_LIBRARY_IMPL(smartfrz_ext, Meta, m) {
  m.impl("gather_history", &smartfrz::gather_history_meta);
}
