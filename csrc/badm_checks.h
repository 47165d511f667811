// Validation of the arguments of the badm_fast ops (fused_step_ext, nonfinite_check_ext,
// copy_check_ext), shared by the CPU and CUDA implementations. Each check function runs before
// anything is written, so a refused call leaves every tensor unchanged. The contract is
// badm_fast/reference.py (fused_step_, nonfinite_check_, copy_check_).
//
// C++ types of the schema's list arguments, as the dispatcher passes them to an unboxed kernel
// (torch 2.13): `Tensor(a!)[]` and `Tensor[]` arrive as at::TensorList, `Tensor?[]` as
// const c10::List<std::optional<at::Tensor>>&; a boxed kernel finds each list as one IValue
// (IValue::toListRef()). TensorListView reads all three in place (no Tensor copy, so no
// reference-count traffic), and the checks are written once against it.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <optional>

namespace badm_fast {

using OptTensorList = c10::List<std::optional<at::Tensor>>;

// The arithmetic (and dual-state) dtype for a storage dtype (reference.compute_dtype).
inline c10::ScalarType compute_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// The storage dtypes the kernels support.
inline bool is_kernel_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
         dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half;
}

// A read-only view of a list argument (Tensor[] or Tensor?[]): get(i) is the i-th tensor by
// reference into the list, or nullptr for None and for an undefined tensor.
class TensorListView {
 public:
  TensorListView() = default;
  TensorListView(at::TensorList list) : tensors_(list.data()), size_(list.size()) {}  // NOLINT
  TensorListView(c10::ArrayRef<c10::IValue> list)                                     // NOLINT
      : values_(list.data()), size_(list.size()) {}
  TensorListView(const OptTensorList& list) : size_(list.size()) {  // NOLINT
    if (size_ > 0) {
      values_ = &list.begin()[0].get();  // the list's IValues are one contiguous vector
    }
  }

  size_t size() const { return size_; }

  const at::Tensor* get(size_t i) const {
    if (tensors_ != nullptr) {
      return tensors_[i].defined() ? &tensors_[i] : nullptr;
    }
    const c10::IValue& v = values_[i];
    if (!v.isTensor()) {
      return nullptr;  // None
    }
    const at::Tensor& t = v.toTensor();
    return t.defined() ? &t : nullptr;
  }

 private:
  const at::Tensor* tensors_ = nullptr;
  const c10::IValue* values_ = nullptr;
  size_t size_ = 0;
};

// An optional tensor argument as a pointer (nullptr for None or an undefined tensor).
inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

namespace detail {

// Same element-to-memory mapping: equal sizes and equal strides on every dimension of size > 1
// (the stride of a size-1 dimension is never used to address an element).
inline bool same_layout(const at::Tensor& x, const at::Tensor& y) {
  const auto xs = x.sizes();
  if (!xs.equals(y.sizes())) {
    return false;
  }
  const auto xt = x.strides();
  const auto yt = y.strides();
  if (xt.equals(yt)) {
    return true;
  }
  for (size_t d = 0; d < xs.size(); ++d) {
    if (xs[d] > 1 && xt[d] != yt[d]) {
      return false;
    }
  }
  return true;
}

// A one-element float32 tensor (found_inf, inv_scale) on `device`.
inline void check_flag(const char* op, const char* name, const at::Tensor& t,
                       const c10::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must have one element, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == c10::ScalarType::Float, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, ", got ", t.device());
}

inline void check_device_type(const char* op, const char* what, const c10::Device& device,
                              c10::DeviceType device_type) {
  TORCH_CHECK(device.type() == device_type, op, ": ", what, " is on ", device,
              ", this implementation takes ", c10::DeviceTypeName(device_type, true), " tensors");
}

}  // namespace detail

// fused_step_ext: params N tensors, one kernel dtype, all on one device of `device_type`, each
// non-overlapping and dense. grads, duals: R*N entries, R = weights.size(0) >= 1. Item i with
// grads[i] None is skipped by the kernels and its other rows and duals are not looked at (as in
// the reference); otherwise grads[r*N + i] (given, params' dtype) and duals[r*N + i] (compute
// dtype) have the sizes and strides of params[i]. weights (R,) compute dtype; hyper (4,)
// float64 contiguous; residuals (2,) float64; found_inf, inv_scale one-element float32; all on
// params' device (weights' device for an empty list). Optional arguments: nullptr for None.
inline int64_t check_fused_step_views(TensorListView params, TensorListView grads,
                                      TensorListView duals, const at::Tensor& weights,
                                      const at::Tensor& hyper, const at::Tensor* residuals,
                                      const at::Tensor* found_inf, const at::Tensor* inv_scale,
                                      c10::DeviceType device_type) {
  constexpr const char* op = "badm_fast::fused_step_ext";
  const size_t N = params.size();
  TORCH_CHECK(weights.defined(), op, ": weights is an undefined tensor");
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) >= 1, op,
              ": weights must have shape (R,) with R >= 1 rows, got shape ", weights.sizes());
  const int64_t R = weights.size(0);
  const size_t RN = static_cast<size_t>(R) * N;
  TORCH_CHECK(grads.size() == RN, op, ": grads must have R*N = ", R, "*", N, " = ", RN,
              " entries (R = weights.size(0), N = len(params)), got ", grads.size());
  TORCH_CHECK(duals.size() == RN, op, ": duals must have R*N = ", R, "*", N, " = ", RN,
              " entries (R = weights.size(0), N = len(params)), got ", duals.size());

  c10::ScalarType dtype = c10::ScalarType::Float;
  c10::Device device = weights.device();
  if (N > 0) {
    const at::Tensor* p0 = params.get(0);
    TORCH_CHECK(p0 != nullptr, op, ": params[0] is an undefined tensor");
    dtype = p0->scalar_type();
    TORCH_CHECK(is_kernel_dtype(dtype), op,
                ": params must be float32, float64, bfloat16 or float16, got ", dtype,
                " for params[0]");
    device = p0->device();
    detail::check_device_type(op, "params[0]", device, device_type);
  } else {
    detail::check_device_type(op, "weights", device, device_type);
  }
  const c10::ScalarType cdt =
      N > 0 ? compute_dtype(dtype)
            : (weights.scalar_type() == c10::ScalarType::Double ? c10::ScalarType::Double
                                                                : c10::ScalarType::Float);

  TORCH_CHECK(weights.scalar_type() == cdt, op, ": weights must have dtype ", cdt,
              " (the compute dtype of params' ", dtype, "), got ", weights.scalar_type());
  TORCH_CHECK(weights.device() == device, op, ": weights must be on ", device, ", got ",
              weights.device());
  TORCH_CHECK(hyper.defined(), op, ": hyper is an undefined tensor");
  TORCH_CHECK(hyper.dim() == 1 && hyper.size(0) == 4, op,
              ": hyper must have shape (4,) [lr, momentum, weight_decay, maximize], got shape ",
              hyper.sizes());
  TORCH_CHECK(hyper.scalar_type() == c10::ScalarType::Double, op, ": hyper must be float64, got ",
              hyper.scalar_type());
  TORCH_CHECK(hyper.is_contiguous(), op, ": hyper must be contiguous, got stride ",
              hyper.strides());
  TORCH_CHECK(hyper.device() == device, op, ": hyper must be on ", device, ", got ",
              hyper.device());
  if (residuals != nullptr) {
    const at::Tensor& r = *residuals;
    TORCH_CHECK(r.dim() == 1 && r.size(0) == 2, op, ": residuals must have shape (2,), got shape ",
                r.sizes());
    TORCH_CHECK(r.scalar_type() == c10::ScalarType::Double, op, ": residuals must be float64, got ",
                r.scalar_type());
    TORCH_CHECK(r.device() == device, op, ": residuals must be on ", device, ", got ", r.device());
  }
  if (found_inf != nullptr) {
    detail::check_flag(op, "found_inf", *found_inf, device);
  }
  if (inv_scale != nullptr) {
    detail::check_flag(op, "inv_scale", *inv_scale, device);
  }

  for (size_t i = 0; i < N; ++i) {
    const at::Tensor* pp = params.get(i);
    TORCH_CHECK(pp != nullptr, op, ": params[", i, "] is an undefined tensor");
    const at::Tensor& p = *pp;
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] has dtype ", p.scalar_type(),
                ", params[0] has ", dtype, " (one dtype per call)");
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(), ", params[0] on ",
                device);
    TORCH_CHECK(p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] must be non-overlapping and dense, got shape ", p.sizes(), " and strides ",
                p.strides());
    if (grads.get(i) == nullptr) {
      continue;  // skipped item
    }
    for (int64_t r = 0; r < R; ++r) {
      const size_t k = static_cast<size_t>(r) * N + i;
      const at::Tensor* g = grads.get(k);
      TORCH_CHECK(g != nullptr, op, ": grads[", k, "] (row ", r, " of params[", i,
                  "]) is None but grads[", i, "] is given: an item has all its rows or none");
      TORCH_CHECK(g->scalar_type() == dtype, op, ": grads[", k, "] must have params' dtype ", dtype,
                  ", got ", g->scalar_type());
      TORCH_CHECK(g->device() == device, op, ": grads[", k, "] must be on ", device, ", got ",
                  g->device());
      TORCH_CHECK(detail::same_layout(*g, p), op, ": grads[", k,
                  "] must have the sizes and strides of params[", i, "] (", p.sizes(), ", ",
                  p.strides(), "), got ", g->sizes(), ", ", g->strides());
      const at::Tensor* d = duals.get(k);
      TORCH_CHECK(d != nullptr, op, ": duals[", k, "] is an undefined tensor");
      TORCH_CHECK(d->scalar_type() == cdt, op, ": duals[", k, "] must have dtype ", cdt,
                  " (the compute dtype of params' ", dtype, "), got ", d->scalar_type());
      TORCH_CHECK(d->device() == device, op, ": duals[", k, "] must be on ", device, ", got ",
                  d->device());
      TORCH_CHECK(detail::same_layout(*d, p), op, ": duals[", k,
                  "] must have the sizes and strides of params[", i, "] (", p.sizes(), ", ",
                  p.strides(), "), got ", d->sizes(), ", ", d->strides());
    }
  }
  return R;
}

// Validates the fused_step_ext arguments for `device_type` before anything is written; returns
// R (rows). The rules: check_fused_step_views.
inline int64_t check_fused_step_args(at::TensorList params, const OptTensorList& grads,
                                     at::TensorList duals, const at::Tensor& weights,
                                     const at::Tensor& hyper,
                                     const std::optional<at::Tensor>& residuals,
                                     const std::optional<at::Tensor>& found_inf,
                                     const std::optional<at::Tensor>& inv_scale,
                                     c10::DeviceType device_type) {
  return check_fused_step_views(params, grads, duals, weights, hyper, opt_ptr(residuals),
                                opt_ptr(found_inf), opt_ptr(inv_scale), device_type);
}

// nonfinite_check_ext(tensors, found_inf): every given tensor of a kernel dtype, non-overlapping
// and dense, on found_inf's device (of `device_type`); found_inf one-element float32.
inline void check_nonfinite_views(TensorListView tensors, const at::Tensor& found_inf,
                                  c10::DeviceType device_type) {
  constexpr const char* op = "badm_fast::nonfinite_check_ext";
  TORCH_CHECK(found_inf.defined(), op, ": found_inf is an undefined tensor");
  const c10::Device device = found_inf.device();
  detail::check_device_type(op, "found_inf", device, device_type);
  detail::check_flag(op, "found_inf", found_inf, device);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor* t = tensors.get(i);
    if (t == nullptr) {
      continue;
    }
    TORCH_CHECK(is_kernel_dtype(t->scalar_type()), op, ": tensors[", i,
                "] must be float32, float64, bfloat16 or float16, got ", t->scalar_type());
    TORCH_CHECK(t->device() == device, op, ": tensors[", i, "] must be on found_inf's device ",
                device, ", got ", t->device());
    TORCH_CHECK(t->is_non_overlapping_and_dense(), op, ": tensors[", i,
                "] must be non-overlapping and dense, got shape ", t->sizes(), " and strides ",
                t->strides());
  }
}

inline void check_nonfinite_args(const OptTensorList& tensors, const at::Tensor& found_inf,
                                 c10::DeviceType device_type) {
  check_nonfinite_views(tensors, found_inf, device_type);
}

// copy_check_ext(dst, src, found_inf): as many src entries as dst; for every given src[i],
// dst[i] and src[i] of one dtype (a kernel dtype when found_inf is given), the same sizes and
// strides, non-overlapping and dense, on one device of `device_type`; found_inf (optional)
// one-element float32 on that device.
inline void check_copy_views(TensorListView dst, TensorListView src, const at::Tensor* found_inf,
                             c10::DeviceType device_type) {
  constexpr const char* op = "badm_fast::copy_check_ext";
  TORCH_CHECK(src.size() == dst.size(), op, ": src must have as many entries as dst (", dst.size(),
              "), got ", src.size());
  std::optional<c10::Device> device;
  if (found_inf != nullptr) {
    device = found_inf->device();
    detail::check_device_type(op, "found_inf", *device, device_type);
    detail::check_flag(op, "found_inf", *found_inf, *device);
  }
  for (size_t i = 0; i < dst.size(); ++i) {
    const at::Tensor* s = src.get(i);
    if (s == nullptr) {
      continue;
    }
    const at::Tensor* dp = dst.get(i);
    TORCH_CHECK(dp != nullptr, op, ": dst[", i, "] is an undefined tensor");
    const at::Tensor& d = *dp;
    if (!device.has_value()) {
      device = d.device();
      TORCH_CHECK(device->type() == device_type, op, ": dst[", i, "] is on ", *device,
                  ", this implementation takes ", c10::DeviceTypeName(device_type, true),
                  " tensors");
    }
    TORCH_CHECK(d.device() == *device, op, ": dst[", i, "] must be on ", *device, ", got ",
                d.device());
    TORCH_CHECK(s->device() == *device, op, ": src[", i, "] must be on ", *device, ", got ",
                s->device());
    TORCH_CHECK(s->scalar_type() == d.scalar_type(), op, ": src[", i, "] must have dst[", i,
                "]'s dtype ", d.scalar_type(), ", got ", s->scalar_type());
    TORCH_CHECK(found_inf == nullptr || is_kernel_dtype(d.scalar_type()), op, ": dst[", i,
                "] must be float32, float64, bfloat16 or float16 for the non-finite check, got ",
                d.scalar_type());
    TORCH_CHECK(d.is_non_overlapping_and_dense(), op, ": dst[", i,
                "] must be non-overlapping and dense, got shape ", d.sizes(), " and strides ",
                d.strides());
    TORCH_CHECK(detail::same_layout(*s, d), op, ": src[", i,
                "] must have the sizes and strides of dst[", i, "] (", d.sizes(), ", ", d.strides(),
                "), got ", s->sizes(), ", ", s->strides());
  }
}

inline void check_copy_args(at::TensorList dst, const OptTensorList& src,
                            const std::optional<at::Tensor>& found_inf,
                            c10::DeviceType device_type) {
  check_copy_views(dst, src, opt_ptr(found_inf), device_type);
}

}  // namespace badm_fast
