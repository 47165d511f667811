// CPU kernel of the fused BADM step: the arguments it takes and its per-instruction-set builds.
//
// The kernel body (badm_cpu_kernel.h) is compiled once per instruction set by
// badm_cpu_default.cpp, badm_cpu_avx2.cpp and badm_cpu_avx512.cpp; binding.cpp validates the
// tensors, fills StepArgs and calls the build that matches at::get_cpu_capability().
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace badm_fast::cpu {

// Raw view of one call. Sizes, strides and offsets are 64-bit; strides count elements.
struct StepArgs {
  c10::ScalarType dtype;    // storage dtype of z and grads: Float, Double, BFloat16 or Half
  void* z;                  // (P,) contiguous, storage dtype
  const void* grads;        // (S, P) storage dtype, unit inner stride
  void* duals;              // (S, P) compute dtype (double for Double, else float)
  const void* weights;      // (S,) compute dtype
  int64_t P;                // number of elements
  int64_t S;                // number of sub-batches, >= 1
  int64_t grad_row_stride;  // elements between rows of grads
  int64_t dual_row_stride;  // elements between rows of duals
  int64_t weight_stride;    // elements between consecutive weights
  double rho;               // proximal coefficient, >= 0
  double sigma;             // penalty, > 0
  double* residuals;        // nullptr, or 2 doubles (elements residual_stride apart) to add to
  int64_t residual_stride;
};

// Elements per work chunk: the unit of at::parallel_for (threads take contiguous runs of
// chunks) and of the residual partial sums; a call with P <= kChunk runs on one thread.
// Measured with S = 4, fp32 and bf16, 2 threads (Xeon, AVX-512, shared 2-core VM), median step
// time, chunks of 4K/8K/16K/32K/64K/256K: at P = 64K, 8K..32K give 20-25 us against 61-69 us
// for one thread; at P = 256K, 4K..32K are within noise (178-203 us fp32) against 354-394 us
// for 256K; at P = 16K, splitting (8K) saves 3 us of 11 and exposes the call to thread wake-up
// delays. 16K sits in the flat middle; fp32 S = 4 moves ~900 KiB per chunk.
constexpr int64_t kChunk = 16384;

// One build each; false when the dtype has no kernel.
bool fused_step_default(const StepArgs& args);
bool fused_step_avx2(const StepArgs& args);    // defined only where the build enables it
bool fused_step_avx512(const StepArgs& args);  // defined only where the build enables it

}  // namespace badm_fast::cpu
