// CUDA implementations of the badm_fast ops defined in ../binding.cpp:
//
//   fused_step_ext(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] duals, Tensor weights,
//       Tensor hyper, Tensor(c!)? residuals=None, Tensor? found_inf=None, Tensor? inv_scale=None)
//   nonfinite_check_ext(Tensor?[] tensors, Tensor(a!) found_inf)
//   copy_check_ext(Tensor(a!)[] dst, Tensor?[] src, Tensor(b!)? found_inf=None)
//
// (the contract: badm_fast/reference.py fused_step_, nonfinite_check_, copy_check_). Each one
// validates its arguments (../badm_checks.h), collects raw pointers and enqueues the kernels of
// badm_kernel.cu on the current stream of the tensors' device. No host synchronisation, no
// host-to-device copy: hyper, weights, found_inf and inv_scale are read by the kernels. The only
// allocation, the residual partial sums of fused_step_ext, comes from the caching allocator
// (at::empty), whose blocks stay reserved for a CUDA graph that captured them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "../badm_checks.h"
#include "badm_kernel.h"

namespace badm_fast {
namespace {

cuda::DType kernel_dtype(c10::ScalarType dtype) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return cuda::DType::kFloat32;
    case c10::ScalarType::Double:
      return cuda::DType::kFloat64;
    case c10::ScalarType::BFloat16:
      return cuda::DType::kBFloat16;
    case c10::ScalarType::Half:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "badm_fast::fused_step_ext: no CUDA kernel for dtype ", dtype);
  }
}

void fused_step_cuda(at::TensorList params, const c10::List<std::optional<at::Tensor>>& grads,
                     at::TensorList duals, const at::Tensor& weights, const at::Tensor& hyper,
                     const std::optional<at::Tensor>& residuals,
                     const std::optional<at::Tensor>& found_inf,
                     const std::optional<at::Tensor>& inv_scale) {
  const int64_t rows = check_fused_step_args(params, grads, duals, weights, hyper, residuals,
                                             found_inf, inv_scale, c10::DeviceType::CUDA);
  const int64_t n = static_cast<int64_t>(params.size());
  if (n == 0) {
    return;
  }
  TORCH_CHECK(rows >= 1 && rows <= cuda::kMaxStepRows,
              "badm_fast::fused_step_ext: the CUDA kernel takes 1 to ", cuda::kMaxStepRows,
              " gradient rows per parameter, got ", rows);
  const c10::cuda::CUDAGuard device_guard(params[0].device());

  // The items the contract does not skip (a gradient, and elements), in order.
  std::vector<int64_t> index;
  index.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (grads.get(i).has_value() && params[i].numel() > 0) {
      index.push_back(i);
    }
  }
  if (index.empty()) {
    return;  // nothing changes, residuals included
  }
  const int64_t m = static_cast<int64_t>(index.size());
  std::vector<void*> param_ptrs(m);
  std::vector<const void*> grad_ptrs(rows * m);
  std::vector<void*> dual_ptrs(rows * m);
  std::vector<int64_t> numel(m);
  for (int64_t k = 0; k < m; ++k) {
    const int64_t i = index[k];
    param_ptrs[k] = params[i].data_ptr();
    numel[k] = params[i].numel();
    for (int64_t r = 0; r < rows; ++r) {
      const std::optional<at::Tensor> g = grads.get(r * n + i);
      TORCH_CHECK(g.has_value(), "badm_fast::fused_step_ext: grads[", r * n + i,
                  "] is None but grads[", i, "] is not (all rows of an item or none)");
      grad_ptrs[r * m + k] = g->const_data_ptr();
      dual_ptrs[r * m + k] = duals[r * n + i].data_ptr();
    }
  }

  cuda::StepCall call{};
  call.dtype = kernel_dtype(params[0].scalar_type());
  call.rows = rows;
  call.items = m;
  call.params = param_ptrs.data();
  call.grads = grad_ptrs.data();
  call.duals = dual_ptrs.data();
  call.numel = numel.data();
  call.hyper = hyper.const_data_ptr<double>();
  call.hyper_stride = hyper.stride(0);
  call.weights = weights.const_data_ptr();
  call.weight_stride = weights.stride(0);
  call.found_inf = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;
  call.inv_scale = inv_scale.has_value() ? inv_scale->const_data_ptr<float>() : nullptr;
  at::Tensor partials;  // alive until the kernels are enqueued; the allocator orders its reuse
  if (residuals.has_value()) {
    const int64_t blocks = cuda::fused_step_blocks(call.dtype, numel.data(), m);
    partials = at::empty({2 * blocks}, hyper.options().dtype(c10::kDouble));
    call.partials = partials.data_ptr<double>();
    call.residuals = residuals->data_ptr<double>();
    call.residual_stride = residuals->stride(0);
  }
  C10_CUDA_CHECK(cuda::launch_fused_step(call, c10::cuda::getCurrentCUDAStream()));
}

// How a dtype's non-finite values look, and its lane size (the real part's for complex dtypes);
// nullopt for dtypes the kernels do not know.
std::optional<uint8_t> kind_of(c10::ScalarType dtype) {
  using c10::ScalarType;
  switch (dtype) {
    case ScalarType::Float:
    case ScalarType::ComplexFloat:
      return cuda::make_kind(cuda::FloatKind::kFloat32, 2);
    case ScalarType::Double:
    case ScalarType::ComplexDouble:
      return cuda::make_kind(cuda::FloatKind::kFloat64, 3);
    case ScalarType::BFloat16:
      return cuda::make_kind(cuda::FloatKind::kBFloat16, 1);
    case ScalarType::Half:
    case ScalarType::ComplexHalf:
      return cuda::make_kind(cuda::FloatKind::kFloat16, 1);
    case ScalarType::Bool:
    case ScalarType::Byte:
    case ScalarType::Char:
      return cuda::make_kind(cuda::FloatKind::kNone, 0);
    case ScalarType::Short:
      return cuda::make_kind(cuda::FloatKind::kNone, 1);
    case ScalarType::Int:
      return cuda::make_kind(cuda::FloatKind::kNone, 2);
    case ScalarType::Long:
      return cuda::make_kind(cuda::FloatKind::kNone, 3);
    default:
      return std::nullopt;
  }
}

// Byte ranges for launch_check; `keep` holds the dense copies of strided tensors alive.
struct CheckList {
  std::vector<void*> dst;
  std::vector<const void*> src;
  std::vector<int64_t> nbytes;
  std::vector<uint8_t> kind;
  std::vector<at::Tensor> keep;

  void add(void* d, const at::Tensor& s, uint8_t k) {
    dst.push_back(d);
    src.push_back(s.const_data_ptr());
    nbytes.push_back(static_cast<int64_t>(s.numel()) * static_cast<int64_t>(s.element_size()));
    kind.push_back(k);
  }

  // Enqueues the check (dst ignored) or the copy, checked when found_inf is given.
  void launch(bool copy, float* found_inf) const {
    if (src.empty()) {
      return;
    }
    cuda::CheckItems items{};
    items.items = static_cast<int64_t>(src.size());
    items.dst = copy ? dst.data() : nullptr;
    items.src = src.data();
    items.nbytes = nbytes.data();
    items.kind = kind.data();
    C10_CUDA_CHECK(cuda::launch_check(items, found_inf, c10::cuda::getCurrentCUDAStream()));
  }
};

// Adds t to a check: its own memory when it is dense, else a dense copy (in memory order any
// order of the elements gives the same answer).
void add_checked(CheckList& list, const at::Tensor& t, const char* op) {
  const std::optional<uint8_t> kind = kind_of(t.scalar_type());
  TORCH_CHECK(kind.has_value(), "badm_fast::", op, ": no CUDA non-finite check for dtype ",
              t.scalar_type());
  if (cuda::kind_float(*kind) == cuda::FloatKind::kNone || t.numel() == 0) {
    return;  // no NaN or infinity in an integer or boolean tensor
  }
  if (t.is_non_overlapping_and_dense()) {
    list.add(nullptr, t, *kind);
  } else {
    list.keep.push_back(t.contiguous());
    list.add(nullptr, list.keep.back(), *kind);
  }
}

void nonfinite_check_cuda(const c10::List<std::optional<at::Tensor>>& tensors,
                          const at::Tensor& found_inf) {
  check_nonfinite_args(tensors, found_inf, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(found_inf.device());
  CheckList list;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<at::Tensor> t = tensors.get(i);
    if (t.has_value()) {
      add_checked(list, *t, "nonfinite_check_ext");
    }
  }
  list.launch(/*copy=*/false, found_inf.data_ptr<float>());
}

void copy_check_cuda(at::TensorList dst, const c10::List<std::optional<at::Tensor>>& src,
                     const std::optional<at::Tensor>& found_inf) {
  check_copy_args(dst, src, found_inf, c10::DeviceType::CUDA);
  if (dst.empty()) {
    return;
  }
  const c10::cuda::CUDAGuard device_guard(dst[0].device());
  if (found_inf.has_value()) {  // refused before anything is written
    for (size_t i = 0; i < dst.size(); ++i) {
      TORCH_CHECK(!src.get(i).has_value() || kind_of(dst[i].scalar_type()).has_value(),
                  "badm_fast::copy_check_ext: no CUDA non-finite check for dtype ",
                  dst[i].scalar_type());
    }
  }
  CheckList copies;    // same dtype and memory layout: one kernel copies and checks
  CheckList rechecks;  // the others: copied by ATen, then the copies checked
  for (size_t i = 0; i < dst.size(); ++i) {
    const std::optional<at::Tensor> s = src.get(i);
    if (!s.has_value() || dst[i].numel() == 0) {
      continue;
    }
    const at::Tensor& d = dst[i];
    const std::optional<uint8_t> kind = kind_of(d.scalar_type());
    const bool direct = kind.has_value() && s->scalar_type() == d.scalar_type() &&
                        s->sizes() == d.sizes() && s->strides() == d.strides() &&
                        d.is_non_overlapping_and_dense() && s->is_non_overlapping_and_dense();
    if (direct) {
      copies.add(d.data_ptr(), *s, *kind);
    } else {
      d.copy_(*s);
      if (found_inf.has_value()) {
        add_checked(rechecks, d, "copy_check_ext");
      }
    }
  }
  float* flag = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  copies.launch(/*copy=*/true, flag);
  if (flag != nullptr) {
    rechecks.launch(/*copy=*/false, flag);
  }
}

}  // namespace
}  // namespace badm_fast

TORCH_LIBRARY_IMPL(badm_fast, CUDA, m) {
  m.impl("fused_step_ext", &badm_fast::fused_step_cuda);
  m.impl("nonfinite_check_ext", &badm_fast::nonfinite_check_cuda);
  m.impl("copy_check_ext", &badm_fast::copy_check_cuda);
}
