// Launchers of the multi-tensor CUDA kernels of badm_fast (badm_kernel.cu): the fused BADM step
// and the non-finite check / checked copy, the kernel contract of badm_fast/reference.py
// (fused_step_, nonfinite_check_, copy_check_). Plain CUDA C++ (no torch headers): the kernel
// source compiles standalone with nvcc; binding_cuda.cpp validates the tensors and calls these.
//
// Every launcher enqueues on `stream` only: no allocation, no host synchronisation, no copy;
// every device value (hyperparameters, weights, found_inf, inv_scale) is read by the kernels.
// CUDA graph capture records the launches with their arguments by value (badm_tables.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "badm_tables.h"

namespace badm_fast::cuda {

// Storage dtype of the params and gradients. The arithmetic, the duals and the weights are
// double for kFloat64 and float otherwise.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

// One fused step over M items (device pointers). The caller has dropped the items that the
// contract skips (no gradient, or no elements); each item's param, gradient rows and dual rows
// are numel consecutive elements in memory.
struct StepCall {
  DType dtype;
  int64_t rows;              // R, 1 <= R <= kMaxStepRows
  int64_t items;             // M
  void* const* params;       // [M] storage dtype
  const void* const* grads;  // [R*M] storage dtype, grads[r*M + m] is row r of item m
  void* const* duals;        // [R*M] compute dtype, duals[r*M + m]
  const int64_t* numel;      // [M], > 0
  const double* hyper;       // [lr, momentum, weight_decay, maximize], hyper_stride apart
  int64_t hyper_stride;
  const void* weights;  // (R,) compute dtype, weight_stride apart
  int64_t weight_stride;
  const float* found_inf;  // nullptr, or one float: non-zero skips the whole step
  const float* inv_scale;  // nullptr, or one float multiplying every gradient first
  double* residuals;       // nullptr, or 2 doubles (residual_stride apart) to add to
  int64_t residual_stride;
  double* partials;  // with residuals: scratch of 2 * fused_step_blocks(...) doubles
};

// The number of blocks of all launches of a step over these sizes: the residual partial sums
// need 2 doubles each.
int64_t fused_step_blocks(DType dtype, const int64_t* numel, int64_t items);

// Enqueues the step (one launch per table, then, with residuals, one reduction launch).
// Returns cudaErrorInvalidValue for a call outside the limits (rows, sizes), else the launch
// status.
cudaError_t launch_fused_step(const StepCall& call, cudaStream_t stream);

// A non-finite check (dst == nullptr) or a copy src -> dst with (found_inf != nullptr) or
// without the check, over byte ranges (CheckItems). The check raises found_inf to 1 (found_inf
// = max(found_inf, 1)) when a lane of a FloatKind item is a NaN or an infinity; it never lowers
// it.
cudaError_t launch_check(const CheckItems& items, float* found_inf, cudaStream_t stream);

}  // namespace badm_fast::cuda
