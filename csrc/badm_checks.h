// Validation of the arguments of badm_fast::fused_step_ext, shared by the CPU and CUDA
// implementations. Every check runs before any element is written, so a refused call leaves
// z, duals and residuals unchanged.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <optional>

namespace badm_fast {

#define BADM_CHECK(cond, ...) TORCH_CHECK(cond, "badm_fast::fused_step_ext: ", __VA_ARGS__)

// The arithmetic dtype (and the dtype of the duals and weights) for a storage dtype.
inline c10::ScalarType compute_dtype(c10::ScalarType dtype) {
  return dtype == c10::ScalarType::Double ? c10::ScalarType::Double : c10::ScalarType::Float;
}

// Checks z (P,), grads (S, P), duals (S, P), weights (S,), rho, sigma and the optional
// residuals (2,) against the kernel contract; `device_type` is the dispatch key's device.
inline void check_fused_step_args(const at::Tensor& z, const at::Tensor& grads,
                                  const at::Tensor& duals, const at::Tensor& weights, double rho,
                                  double sigma, const std::optional<at::Tensor>& residuals,
                                  c10::DeviceType device_type) {
  const auto dtype = z.scalar_type();
  BADM_CHECK(dtype == c10::ScalarType::Float || dtype == c10::ScalarType::Double ||
                 dtype == c10::ScalarType::BFloat16 || dtype == c10::ScalarType::Half,
             "z must be float32, float64, bfloat16 or float16, got ", dtype);
  const auto cdt = compute_dtype(dtype);
  BADM_CHECK(z.dim() == 1, "z must be 1-D, got shape ", z.sizes());
  BADM_CHECK(z.is_contiguous(), "z must be contiguous, got stride ", z.strides());
  const int64_t P = z.size(0);

  BADM_CHECK(grads.dim() == 2, "grads must be 2-D (S, P), got shape ", grads.sizes());
  const int64_t S = grads.size(0);
  BADM_CHECK(S >= 1, "need at least one sub-batch (S >= 1), got grads of shape ", grads.sizes());
  BADM_CHECK(grads.size(1) == P, "grads must have shape (S, P) = (", S, ", ", P,
             ") to match z, got ", grads.sizes());
  BADM_CHECK(grads.scalar_type() == dtype, "grads must have z's dtype ", dtype, ", got ",
             grads.scalar_type());
  BADM_CHECK(duals.dim() == 2 && duals.size(0) == S && duals.size(1) == P,
             "duals must have the shape of grads ", grads.sizes(), ", got ", duals.sizes());
  BADM_CHECK(duals.scalar_type() == cdt, "duals must have dtype ", cdt,
             " (the compute dtype of z's ", dtype, "), got ", duals.scalar_type());
  for (const auto* t : {&grads, &duals}) {
    const char* name = t == &grads ? "grads" : "duals";
    BADM_CHECK(P <= 1 || t->stride(1) == 1, name, " must have unit inner stride, got strides ",
               t->strides());
    BADM_CHECK(S == 1 || t->stride(0) >= P, name, " rows must not overlap (row stride >= P = ", P,
               "), got strides ", t->strides());
  }
  BADM_CHECK(weights.dim() == 1 && weights.size(0) == S, "weights must have shape (S,) = (", S,
             ",), got ", weights.sizes());
  BADM_CHECK(weights.scalar_type() == cdt, "weights must have dtype ", cdt,
             " (the compute dtype of z's ", dtype, "), got ", weights.scalar_type());
  BADM_CHECK(rho >= 0.0, "rho must be >= 0, got ", rho);
  BADM_CHECK(sigma > 0.0, "sigma must be > 0, got ", sigma);
  if (residuals.has_value()) {
    const at::Tensor& r = *residuals;
    BADM_CHECK(r.dim() == 1 && r.size(0) == 2, "residuals must have shape (2,), got ", r.sizes());
    BADM_CHECK(r.scalar_type() == c10::ScalarType::Double, "residuals must be float64, got ",
               r.scalar_type());
  }

  const c10::Device device = z.device();
  BADM_CHECK(device.type() == device_type, "z is on ", device, ", expected a ",
             c10::DeviceTypeName(device_type), " tensor");
  BADM_CHECK(grads.device() == device, "grads must be on z's device ", device, ", got ",
             grads.device());
  BADM_CHECK(duals.device() == device, "duals must be on z's device ", device, ", got ",
             duals.device());
  BADM_CHECK(weights.device() == device, "weights must be on z's device ", device, ", got ",
             weights.device());
  if (residuals.has_value()) {
    BADM_CHECK(residuals->device() == device, "residuals must be on z's device ", device, ", got ",
               residuals->device());
  }
}

}  // namespace badm_fast
