// badm_fast._C: registers the op badm_fast::fused_step_ext and its CPU implementation.
//
//   fused_step_ext(Tensor(a!) z, Tensor grads, Tensor(b!) duals, Tensor weights,
//                  float rho, float sigma, Tensor(c!)? residuals=None) -> ()
//
// One fused BADM step in place on z and duals (see badm_element.h and docs/algorithm.md). The
// CUDA implementation, when built, lives in cuda/binding_cuda.cpp; the fake (meta)
// implementation used by torch.compile is registered from Python.
#include <Python.h>  // first, as Python requires

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "badm_checks.h"
#include "badm_cpu.h"

namespace badm_fast {
namespace {

using CpuStepFn = bool (*)(const cpu::StepArgs&);

// The build of the CPU kernel matching the instruction set torch itself uses for its CPU
// kernels (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|avx512).
CpuStepFn select_cpu_kernel() {
#if defined(BADM_FAST_CPU_ISA_DISPATCH)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return cpu::fused_step_avx512;
  }
  if (capability == "AVX2") {
    return cpu::fused_step_avx2;
  }
#endif
  return cpu::fused_step_default;
}

void fused_step_cpu(const at::Tensor& z, const at::Tensor& grads, const at::Tensor& duals,
                    const at::Tensor& weights, double rho, double sigma,
                    const std::optional<at::Tensor>& residuals) {
  check_fused_step_args(z, grads, duals, weights, rho, sigma, residuals, c10::DeviceType::CPU);
  static const CpuStepFn kernel = select_cpu_kernel();
  cpu::StepArgs args{};
  args.dtype = z.scalar_type();
  args.z = z.data_ptr();
  args.grads = grads.const_data_ptr();
  args.duals = duals.data_ptr();
  args.weights = weights.const_data_ptr();
  args.P = z.size(0);
  args.S = grads.size(0);
  args.grad_row_stride = grads.stride(0);
  args.dual_row_stride = duals.stride(0);
  args.weight_stride = weights.stride(0);
  args.rho = rho;
  args.sigma = sigma;
  if (residuals.has_value()) {
    args.residuals = residuals->data_ptr<double>();
    args.residual_stride = residuals->stride(0);
  }
  TORCH_CHECK(kernel(args), "badm_fast::fused_step_ext: no CPU kernel for dtype ", args.dtype);
}

}  // namespace
}  // namespace badm_fast

TORCH_LIBRARY(badm_fast, m) {
  m.def(
      "fused_step_ext(Tensor(a!) z, Tensor grads, Tensor(b!) duals, Tensor weights, float rho, "
      "float sigma, Tensor(c!)? residuals=None) -> ()");
}

TORCH_LIBRARY_IMPL(badm_fast, CPU, m) { m.impl("fused_step_ext", &badm_fast::fused_step_cpu); }

// `import badm_fast._C` loads this library, which runs the registrations above; the module
// itself is empty (the op is reached as torch.ops.badm_fast.fused_step_ext).
static struct PyModuleDef badm_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of badm_fast (torch.ops.badm_fast).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&badm_fast_c_module); }
