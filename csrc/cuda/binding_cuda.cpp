// CUDA implementation of badm_fast::fused_step_ext (the op is defined in ../binding.cpp):
// validates the tensors and enqueues the kernel of badm_kernel.cu on the current stream of
// z's device. No host synchronisation.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../badm_checks.h"
#include "badm_kernel.h"

namespace badm_fast {
namespace {

cuda::DType to_kernel_dtype(c10::ScalarType dtype) {
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

void fused_step_cuda(const at::Tensor& z, const at::Tensor& grads, const at::Tensor& duals,
                     const at::Tensor& weights, double rho, double sigma,
                     const std::optional<at::Tensor>& residuals) {
  check_fused_step_args(z, grads, duals, weights, rho, sigma, residuals, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(z.device());
  // The kernel reads the S weights contiguously; a strided view is copied (stream-ordered, so
  // the temporary outlives the kernel's use of it in the caching allocator).
  const at::Tensor w = weights.contiguous();
  cuda::StepArgs args{};
  args.dtype = to_kernel_dtype(z.scalar_type());
  args.z = z.data_ptr();
  args.grads = grads.const_data_ptr();
  args.duals = duals.data_ptr();
  args.weights = w.const_data_ptr();
  args.P = z.size(0);
  args.S = grads.size(0);
  args.grad_row_stride = grads.stride(0);
  args.dual_row_stride = duals.stride(0);
  args.rho = rho;
  args.sigma = sigma;
  if (residuals.has_value()) {
    args.residuals = residuals->data_ptr<double>();
    args.residual_stride = residuals->stride(0);
  }
  C10_CUDA_CHECK(cuda::launch_fused_step(args, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace
}  // namespace badm_fast

TORCH_LIBRARY_IMPL(badm_fast, CUDA, m) { m.impl("fused_step_ext", &badm_fast::fused_step_cuda); }
