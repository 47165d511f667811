// Launcher of the CUDA kernel of the fused BADM step. Plain CUDA C++ (no torch headers): the
// kernel source compiles standalone with nvcc; binding_cuda.cpp wires it into badm_fast._C.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace badm_fast::cuda {

// Storage dtype of z and grads. The arithmetic, the duals and the weights are double for
// kFloat64 and float otherwise.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// Raw view of one call (device pointers; sizes, strides and offsets are 64-bit element counts).
struct StepArgs {
  DType dtype;
  void* z;                  // (P,) contiguous, storage dtype
  const void* grads;        // (S, P) storage dtype, unit inner stride
  void* duals;              // (S, P) compute dtype, unit inner stride
  const void* weights;      // (S,) compute dtype, contiguous
  int64_t P;                // number of elements (0: nothing is launched)
  int64_t S;                // number of sub-batches, >= 1
  int64_t grad_row_stride;  // elements between rows of grads
  int64_t dual_row_stride;  // elements between rows of duals
  double rho;               // proximal coefficient, >= 0
  double sigma;             // penalty, > 0
  double* residuals;        // nullptr, or 2 doubles (residual_stride apart) that the kernel adds to
  int64_t residual_stride;
};

// Enqueues the step on `stream`. Uses 16-byte vector loads and stores when z, grads and duals
// (base pointers and row strides) are 16-byte aligned, scalar accesses otherwise. Returns the
// launch status (cudaSuccess, or the error of an invalid configuration); never synchronises.
cudaError_t launch_fused_step(const StepArgs& args, cudaStream_t stream);

}  // namespace badm_fast::cuda
