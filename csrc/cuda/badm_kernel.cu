// Multi-tensor CUDA kernels of badm_fast: the fused BADM step over tensor lists and the
// non-finite check / checked copy. The contract is badm_fast/reference.py (fused_step_,
// step_constants, nonfinite_check_, copy_check_); the launch tables are in badm_tables.h.
//
// Bit-identical to the reference by construction, for every storage dtype:
//  * The constants are derived on the device from the float64 hyper tensor with the
//    operations of reference.step_constants in the same order (IEEE double, round to nearest),
//    then rounded once to the compute dtype (__double2float_rn).
//  * Every per-element operation is an explicitly rounded intrinsic (__fmul_rn, __fadd_rn,
//    __fsub_rn and the __d*_rn doubles), which the compiler never contracts into a fused
//    multiply-add, in the order of the contract; the build also passes --fmad=false. No
//    fast-math, no flush-to-zero (nvcc's defaults).
//  * Widening to the compute dtype is exact; the final rounding to bf16/fp16 is the
//    round-to-nearest-even conversion that torch's own CUDA casts use.
// Residual sums are deterministic: each block reduces its elements in a fixed order (thread
// partials, then a fixed shuffle tree) into its own slot of a scratch buffer; a second, single
// block kernel sums the slots in index order and adds the result to `residuals`. The block
// decomposition depends only on the tensor sizes and dtype. No atomics.
//
// found_inf is read by every block after the block has issued its first loads, so the flag's
// latency overlaps them; when it is non-zero the block returns before any store.
//
// Memory parallelism: per iteration a thread handles 16 elements (fp32, bf16, fp16) or 8
// (fp64): four 16-byte vectors of each fp32/fp64 stream (z, every gradient row, every dual row),
// two of the bf16/fp16 z and gradients. ptxas (sm_90) gives the step kernels 110-128 registers,
// so the launch bounds keep two blocks of 256 threads per SM: with fp32 about 128 B of gradient
// and dual loads in flight per thread and row, 64 KiB per SM (96 KiB with z in the first row);
// more resident threads would need fewer registers, hence fewer elements, per thread. Vector
// accesses need every pointer of the tensor 16-byte aligned (a table flag); a misaligned
// tensor, and the last partial vector of a tensor, use element accesses, still 16 (or 8)
// elements per thread per iteration. All indices are int64.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "badm_kernel.h"
#include "badm_tables.h"

namespace badm_fast::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Arithmetic, each operation rounded to nearest even and never contracted.

__device__ __forceinline__ float op_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ float op_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float op_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double op_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double op_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double op_sub(double a, double b) { return __dsub_rn(a, b); }

// Storage type T: compute type A, kW elements per 16-byte vector, kE elements per thread per
// iteration.
template <typename T>
struct Traits;
template <>
struct Traits<float> {
  using A = float;
  static constexpr int kW = 4;
  static constexpr int kE = 16;
  static __device__ __forceinline__ float widen(float x) { return x; }
  static __device__ __forceinline__ float narrow(float x) { return x; }
};
template <>
struct Traits<double> {
  using A = double;
  static constexpr int kW = 2;
  static constexpr int kE = 8;
  static __device__ __forceinline__ double widen(double x) { return x; }
  static __device__ __forceinline__ double narrow(double x) { return x; }
};
template <>
struct Traits<__nv_bfloat16> {
  using A = float;
  static constexpr int kW = 8;
  static constexpr int kE = 16;
  static __device__ __forceinline__ float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Traits<__half> {
  using A = float;
  static constexpr int kW = 8;
  static constexpr int kE = 16;
  static __device__ __forceinline__ float widen(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half narrow(float x) { return __float2half_rn(x); }
};

// Elements per block (chunk) of the step.
template <typename T>
constexpr int64_t kStepChunk = int64_t(kThreads) * Traits<T>::kE * kStepIters;

// ---------------------------------------------------------------------------------------------
// Memory access: N elements from/to p, as 16-byte vectors when N * sizeof(T) is a multiple of
// 16 (p is then 16-byte aligned: table flag), element by element otherwise.

template <int N, typename T>
__device__ __forceinline__ void load_n(const T* __restrict__ p, T (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      const uint4 bits = reinterpret_cast<const uint4*>(p)[c];
      const T* lanes = reinterpret_cast<const T*>(&bits);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        v[c * kPer + j] = lanes[j];
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      v[j] = p[j];
    }
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_n(T* __restrict__ p, const T (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      uint4 bits;
      T* lanes = reinterpret_cast<T*>(&bits);
#pragma unroll
      for (int j = 0; j < kPer; ++j) {
        lanes[j] = v[c * kPer + j];
      }
      reinterpret_cast<uint4*>(p)[c] = bits;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      p[j] = v[j];
    }
  }
}

// Sum of v over the block, in a fixed order; valid in thread 0. `shared` holds a double per
// warp; every thread of the block must call it.
__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    shared[warp] = v;
  }
  __syncthreads();
  v = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      v = __dadd_rn(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
  }
  __syncthreads();
  return v;
}

// ---------------------------------------------------------------------------------------------
// The fused step.

struct StepScalars {
  const double* hyper;
  int64_t hyper_stride;
  const void* weights;
  int64_t weight_stride;
  const float* found_inf;
  const float* inv_scale;
  double* partials;  // this launch's first partial (2 doubles per block), or nullptr
  int32_t rows;
  int32_t tensors;
};
static_assert(sizeof(StepScalars) + sizeof(StepTable) <= 4096, "kernel arguments over 4 KiB");

// reference.step_constants: derived in double in its order, rounded once to A.
template <typename A>
struct Constants {
  A a, b, c, d, e, wd, sign;
};

template <typename A>
__device__ __forceinline__ A round_to(double x) {
  if constexpr (std::is_same_v<A, double>) {
    return x;
  } else {
    return __double2float_rn(x);
  }
}

template <typename A>
__device__ __forceinline__ Constants<A> step_constants(const double* hyper, int64_t stride) {
  const double lr = hyper[0];
  const double mu = hyper[stride];
  const double wd = hyper[2 * stride];
  const double mx = hyper[3 * stride];
  const double one_minus = __dsub_rn(1.0, mu);
  const double two_mu_minus_one = __dsub_rn(__dmul_rn(2.0, mu), 1.0);
  Constants<A> k;
  k.a = round_to<A>(mu);
  k.b = round_to<A>(one_minus);
  k.c = round_to<A>(__dmul_rn(-2.0, lr));
  k.d = round_to<A>(__ddiv_rn(__dmul_rn(lr, two_mu_minus_one), one_minus));
  k.e = round_to<A>(lr);
  k.wd = round_to<A>(wd);
  k.sign = round_to<A>(__dsub_rn(1.0, __dmul_rn(2.0, mx)));
  return k;
}

// reference.step_switches: weight_decay != 0 (add wd*z) and maximize != 0 (multiply by sign),
// compared in double. Every block reads them with the constants: the weight decay selects the
// instantiation of its loops (a block-uniform branch, no per-element test); maximize joins
// inv_scale in the block-uniform `scaled` path, which multiplies by both (a multiplier not in
// use is exactly 1: inv = 1 without inv_scale, sign = 1 - 2*0 = 1 without maximize, and
// g*1 == g, NaN payloads aside).
__device__ __forceinline__ bool decay_switch(const double* hyper, int64_t stride) {
  return hyper[2 * stride] != 0.0;
}
__device__ __forceinline__ bool maximize_switch(const double* hyper, int64_t stride) {
  return hyper[3 * stride] != 0.0;
}

// One row at one element (reference.fused_step_'s loop body); z is read only with kDecay
// (wz = wd*z); inv and sign only when `scaled`.
template <bool kResiduals, bool kDecay, typename A>
__device__ __forceinline__ A step_row(A g, A pi, A z, A alpha, const Constants<A>& k, bool scaled,
                                      A inv, A& delta, A& prim) {
  if (scaled) {
    g = op_mul(g, inv);
    g = op_mul(g, k.sign);
  }
  if constexpr (kDecay) {
    g = op_add(g, op_mul(k.wd, z));
  }
  const A new_pi = op_sub(op_mul(k.a, pi), op_mul(k.b, g));
  const A t = op_add(op_mul(k.c, g), op_mul(k.d, pi));
  delta = op_add(delta, op_mul(alpha, t));
  if constexpr (kResiduals) {
    const A l = op_mul(op_add(g, pi), k.e);
    prim = op_add(prim, op_mul(op_mul(alpha, l), l));
  }
  return new_pi;
}

// The step over `units` units of W elements starting `begin` elements into the tensor whose
// pointers start at table.ptr[base]: G units per thread per iteration, unit u of an iteration
// handled by thread u % kThreads. On the block's first loads (`first`), reads found_inf and
// returns false (for the whole block, before any store) when it is non-zero.
template <typename T, bool kResiduals, bool kDecay, int W, int G>
__device__ __forceinline__ bool step_units(const StepScalars& s, const StepTable& table, int base,
                                           int64_t begin, int64_t units,
                                           const Constants<typename Traits<T>::A>& k, bool scaled,
                                           typename Traits<T>::A inv, bool& first, double& primal,
                                           double& dual) {
  using A = typename Traits<T>::A;
  constexpr int64_t kPerIter = int64_t(kThreads) * G;
  T* __restrict__ z = static_cast<T*>(table.ptr[base]) + begin;
  const A* __restrict__ weights = static_cast<const A*>(s.weights);
  const int64_t iters = (units + kPerIter - 1) / kPerIter;
  for (int64_t it = 0; it < iters; ++it) {
    const int64_t u0 = it * kPerIter + threadIdx.x;
    bool valid[G];
    A zc[G][W];
#pragma unroll
    for (int q = 0; q < G; ++q) {
      const int64_t u = u0 + int64_t(q) * kThreads;
      valid[q] = u < units;
      if (valid[q]) {
        T v[W];
        load_n<W>(z + u * W, v);
#pragma unroll
        for (int j = 0; j < W; ++j) {
          zc[q][j] = Traits<T>::widen(v[j]);
        }
      }
    }
    if (first) {  // block-uniform
      first = false;
      if (s.found_inf != nullptr && __syncthreads_or(*s.found_inf != 0.0f)) {
        return false;
      }
    }
    A delta[G][W];
    A prim[G][W];
#pragma unroll
    for (int q = 0; q < G; ++q) {
#pragma unroll
      for (int j = 0; j < W; ++j) {
        delta[q][j] = A(0);
        prim[q][j] = A(0);
      }
    }
#pragma unroll 1
    for (int r = 0; r < s.rows; ++r) {
      const T* __restrict__ grad = static_cast<const T*>(table.ptr[base + 1 + r]) + begin;
      A* __restrict__ dual_row = static_cast<A*>(table.ptr[base + 1 + s.rows + r]) + begin;
      const A alpha = weights[r * s.weight_stride];
#pragma unroll
      for (int q = 0; q < G; ++q) {
        if (valid[q]) {
          const int64_t u = u0 + int64_t(q) * kThreads;
          T gv[W];
          A pv[W];
          load_n<W>(grad + u * W, gv);
          load_n<W>(dual_row + u * W, pv);
#pragma unroll
          for (int j = 0; j < W; ++j) {
            pv[j] = step_row<kResiduals, kDecay>(Traits<T>::widen(gv[j]), pv[j], zc[q][j], alpha,
                                                 k, scaled, inv, delta[q][j], prim[q][j]);
          }
          store_n<W>(dual_row + u * W, pv);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < G; ++q) {
      if (valid[q]) {
        const int64_t u = u0 + int64_t(q) * kThreads;
        T v[W];
#pragma unroll
        for (int j = 0; j < W; ++j) {
          v[j] = Traits<T>::narrow(op_add(zc[q][j], delta[q][j]));
          if constexpr (kResiduals) {
            primal = __dadd_rn(primal, static_cast<double>(prim[q][j]));
            dual = __dadd_rn(dual, static_cast<double>(op_mul(delta[q][j], delta[q][j])));
          }
        }
        store_n<W>(z + u * W, v);
      }
    }
  }
  return true;
}

// The n elements of one chunk, starting `begin` elements into tensor t (pointers from
// table.ptr[base]): vector units where the tensor is aligned, then its last partial vector.
template <typename T, bool kResiduals, bool kDecay>
__device__ __forceinline__ bool step_chunk(const StepScalars& s, const StepTable& table, int t,
                                           int base, int64_t begin, int64_t n,
                                           const Constants<typename Traits<T>::A>& k, bool scaled,
                                           typename Traits<T>::A inv, double& primal,
                                           double& dual) {
  constexpr int kW = Traits<T>::kW;
  constexpr int kE = Traits<T>::kE;
  bool first = true;
  bool stored;
  if (table.vec[t] != 0) {
    const int64_t vectors = n / kW;
    stored = step_units<T, kResiduals, kDecay, kW, kE / kW>(s, table, base, begin, vectors, k,
                                                            scaled, inv, first, primal, dual);
    if (stored && vectors * kW < n) {
      stored = step_units<T, kResiduals, kDecay, 1, 1>(
          s, table, base, begin + vectors * kW, n - vectors * kW, k, scaled, inv, first, primal,
          dual);
    }
  } else {
    stored = step_units<T, kResiduals, kDecay, 1, kE>(s, table, base, begin, n, k, scaled, inv,
                                                      first, primal, dual);
  }
  return stored;
}

// Block b processes chunk b - first_block[t] of tensor t: elements
// [chunk * kStepChunk<T>, ...) of its param, gradient rows and dual rows.
template <typename T, bool kResiduals>
__global__ void __launch_bounds__(kThreads, 2)
    fused_step_kernel(const StepScalars s, const StepTable table) {
  using A = typename Traits<T>::A;
  constexpr int64_t kChunk = kStepChunk<T>;
  const uint32_t b = blockIdx.x;
  const int t = find_tensor(table.first_block, s.tensors, b);
  const int64_t begin = static_cast<int64_t>(b - table.first_block[t]) * kChunk;
  const int64_t left = table.numel[t] - begin;
  const int64_t n = left < kChunk ? left : kChunk;
  const int base = t * (1 + 2 * s.rows);
  const Constants<A> k = step_constants<A>(s.hyper, s.hyper_stride);
  const bool decay = decay_switch(s.hyper, s.hyper_stride);
  const bool scaled = s.inv_scale != nullptr || maximize_switch(s.hyper, s.hyper_stride);
  const A inv = s.inv_scale != nullptr ? static_cast<A>(*s.inv_scale) : A(1);
  double primal = 0.0;
  double dual = 0.0;
  const bool stored =
      decay  // block-uniform: every thread reads the same hyper
          ? step_chunk<T, kResiduals, true>(s, table, t, base, begin, n, k, scaled, inv, primal,
                                            dual)
          : step_chunk<T, kResiduals, false>(s, table, t, base, begin, n, k, scaled, inv, primal,
                                             dual);
  if constexpr (kResiduals) {
    if (stored) {  // block-uniform
      __shared__ double warp_sums[kThreads / 32];
      primal = block_sum(primal, warp_sums);
      dual = block_sum(dual, warp_sums);
      if (threadIdx.x == 0) {
        s.partials[2 * int64_t(b)] = primal;
        s.partials[2 * int64_t(b) + 1] = dual;
      }
    }
  }
}

// residuals += (sum of the prim partials, sum of the dual partials), summed in index order per
// thread then by a fixed tree; nothing when found_inf is non-zero (then the partials are not
// all written).
constexpr int kReduceThreads = 512;

__global__ void __launch_bounds__(kReduceThreads)
    reduce_residuals_kernel(const double* __restrict__ partials, int64_t blocks,
                            double* __restrict__ residuals, int64_t stride,
                            const float* __restrict__ found_inf) {
  if (found_inf != nullptr && __syncthreads_or(*found_inf != 0.0f)) {
    return;
  }
  double primal = 0.0;
  double dual = 0.0;
  for (int64_t i = threadIdx.x; i < blocks; i += kReduceThreads) {
    primal = __dadd_rn(primal, partials[2 * i]);
    dual = __dadd_rn(dual, partials[2 * i + 1]);
  }
  __shared__ double warp_sums[kReduceThreads / 32];
  primal = block_sum(primal, warp_sums);
  dual = block_sum(dual, warp_sums);
  if (threadIdx.x == 0) {
    residuals[0] = __dadd_rn(residuals[0], primal);
    residuals[stride] = __dadd_rn(residuals[stride], dual);
  }
}

template <typename T>
cudaError_t launch_step(const StepCall& call, cudaStream_t stream) {
  StepScalars s{};
  s.hyper = call.hyper;
  s.hyper_stride = call.hyper_stride;
  s.weights = call.weights;
  s.weight_stride = call.weight_stride;
  s.found_inf = call.found_inf;
  s.inv_scale = call.inv_scale;
  s.rows = static_cast<int32_t>(call.rows);
  const bool residuals = call.residuals != nullptr;
  void (*kernel)(StepScalars, StepTable) =
      residuals ? fused_step_kernel<T, true> : fused_step_kernel<T, false>;
  const StepItems items{call.rows, call.items, call.params, call.grads, call.duals, call.numel};
  StepTable table{};
  cudaError_t err = cudaSuccess;
  int64_t total = 0;
  const PlanStatus status =
      plan_step(items, kStepChunk<T>, table,
                [&](const StepTable& t, int tensors, uint32_t blocks, int64_t offset) {
                  s.tensors = tensors;
                  s.partials = residuals ? call.partials + 2 * offset : nullptr;
                  kernel<<<blocks, kThreads, 0, stream>>>(s, t);
                  err = cudaGetLastError();
                  total = offset + blocks;
                  return err == cudaSuccess;
                });
  if (status == PlanStatus::kLaunchFailed) {
    return err;
  }
  if (status != PlanStatus::kOk) {
    return cudaErrorInvalidValue;
  }
  if (residuals && total > 0) {
    reduce_residuals_kernel<<<1, kReduceThreads, 0, stream>>>(call.partials, total, call.residuals,
                                                              call.residual_stride, call.found_inf);
    err = cudaGetLastError();
  }
  return err;
}

// ---------------------------------------------------------------------------------------------
// Non-finite check and checked copy over byte ranges.

struct CheckScalars {
  float* found_inf;  // nullptr: copy alone
  int32_t tensors;
};
static_assert(sizeof(CheckScalars) + sizeof(CheckTable) <= 4096, "kernel arguments over 4 KiB");

// Exponent-all-ones test of one lane (NaN or infinity) holding `bits`.
__device__ __forceinline__ bool lane_nonfinite(uint64_t bits, FloatKind kind) {
  switch (kind) {
    case FloatKind::kFloat32:
      return (bits & 0x7F800000u) == 0x7F800000u;
    case FloatKind::kFloat64:
      return (bits & 0x7FF0000000000000ull) == 0x7FF0000000000000ull;
    case FloatKind::kBFloat16:
      return (bits & 0x7F80u) == 0x7F80u;
    case FloatKind::kFloat16:
      return (bits & 0x7C00u) == 0x7C00u;
    default:
      return false;
  }
}

// The same test on a 16-byte vector of lanes of `kind` (little-endian).
__device__ __forceinline__ bool vector_nonfinite(const uint4& v, FloatKind kind) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  bool bad = false;
  switch (kind) {
    case FloatKind::kFloat32:
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        bad |= (w[i] & 0x7F800000u) == 0x7F800000u;
      }
      break;
    case FloatKind::kFloat64:  // the exponent is in the high word of each double
      bad = (w[1] & 0x7FF00000u) == 0x7FF00000u || (w[3] & 0x7FF00000u) == 0x7FF00000u;
      break;
    case FloatKind::kBFloat16:
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        bad |= (w[i] & 0x7F80u) == 0x7F80u || (w[i] & 0x7F800000u) == 0x7F800000u;
      }
      break;
    case FloatKind::kFloat16:
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        bad |= (w[i] & 0x7C00u) == 0x7C00u || (w[i] & 0x7C000000u) == 0x7C000000u;
      }
      break;
    default:
      break;
  }
  return bad;
}

__device__ __forceinline__ uint64_t load_lane(const char* p, int lane_log2) {
  switch (lane_log2) {
    case 0:
      return *reinterpret_cast<const uint8_t*>(p);
    case 1:
      return *reinterpret_cast<const uint16_t*>(p);
    case 2:
      return *reinterpret_cast<const uint32_t*>(p);
    default:
      return *reinterpret_cast<const uint64_t*>(p);
  }
}

__device__ __forceinline__ void store_lane(char* p, int lane_log2, uint64_t bits) {
  switch (lane_log2) {
    case 0:
      *reinterpret_cast<uint8_t*>(p) = static_cast<uint8_t>(bits);
      break;
    case 1:
      *reinterpret_cast<uint16_t*>(p) = static_cast<uint16_t>(bits);
      break;
    case 2:
      *reinterpret_cast<uint32_t*>(p) = static_cast<uint32_t>(bits);
      break;
    default:
      *reinterpret_cast<uint64_t*>(p) = bits;
      break;
  }
}

constexpr int kCheckLanes = 8;  // lanes per thread per iteration of the element path

// Block b: chunk b - first_block[t] of tensor t, kCheckChunk bytes. kCopy: dst <- src; the
// check raises *found_inf to 1 (never lowers it) when a lane is non-finite.
template <bool kCopy, bool kCheck>
__global__ void __launch_bounds__(kThreads)
    check_kernel(const CheckScalars s, const CheckTable table) {
  const uint32_t b = blockIdx.x;
  const int t = find_tensor(table.first_block, s.tensors, b);
  const int64_t begin = static_cast<int64_t>(b - table.first_block[t]) * kCheckChunk;
  const int64_t left = table.nbytes[t] - begin;
  const int64_t n = left < kCheckChunk ? left : kCheckChunk;
  const uint8_t kind_byte = table.kind[t];
  const FloatKind kind = kind_float(kind_byte);
  const int lane_log2 = kind_lane_log2(kind_byte);
  const char* __restrict__ src = static_cast<const char*>(table.src[t]) + begin;
  char* __restrict__ dst = kCopy ? static_cast<char*>(table.dst[t]) + begin : nullptr;
  bool bad = false;
  int64_t done = 0;  // bytes handled by the vector path
  if ((kind_byte & kKindVec) != 0) {
    const int64_t vectors = n / 16;
    constexpr int64_t kPerIter = int64_t(kThreads) * kCheckVectors;
    for (int64_t u0 = threadIdx.x; u0 < vectors; u0 += kPerIter) {
      uint4 v[kCheckVectors];
#pragma unroll
      for (int q = 0; q < kCheckVectors; ++q) {
        const int64_t u = u0 + int64_t(q) * kThreads;
        if (u < vectors) {
          v[q] = __ldg(reinterpret_cast<const uint4*>(src) + u);
        }
      }
#pragma unroll
      for (int q = 0; q < kCheckVectors; ++q) {
        const int64_t u = u0 + int64_t(q) * kThreads;
        if (u < vectors) {
          if constexpr (kCopy) {
            reinterpret_cast<uint4*>(dst)[u] = v[q];
          }
          if constexpr (kCheck) {
            bad |= vector_nonfinite(v[q], kind);
          }
        }
      }
    }
    done = vectors * 16;
  }
  const int64_t lanes = (n - done) >> lane_log2;
  constexpr int64_t kPerIter = int64_t(kThreads) * kCheckLanes;
  for (int64_t u0 = threadIdx.x; u0 < lanes; u0 += kPerIter) {
    uint64_t v[kCheckLanes];
#pragma unroll
    for (int q = 0; q < kCheckLanes; ++q) {
      const int64_t u = u0 + int64_t(q) * kThreads;
      if (u < lanes) {
        v[q] = load_lane(src + done + (u << lane_log2), lane_log2);
      }
    }
#pragma unroll
    for (int q = 0; q < kCheckLanes; ++q) {
      const int64_t u = u0 + int64_t(q) * kThreads;
      if (u < lanes) {
        if constexpr (kCopy) {
          store_lane(dst + done + (u << lane_log2), lane_log2, v[q]);
        }
        if constexpr (kCheck) {
          bad |= lane_nonfinite(v[q], kind);
        }
      }
    }
  }
  if constexpr (kCheck) {
    if (__syncthreads_or(bad) && threadIdx.x == 0) {
      // found_inf = max(found_inf, 1): every writer writes 1, so the order does not matter; a
      // NaN flag stays NaN as torch.maximum keeps it.
      if (*s.found_inf < 1.0f) {
        *s.found_inf = 1.0f;
      }
    }
  }
}

}  // namespace

int64_t fused_step_blocks(DType dtype, const int64_t* numel, int64_t items) {
  switch (dtype) {
    case DType::kFloat32:
      return step_blocks(numel, items, kStepChunk<float>);
    case DType::kFloat64:
      return step_blocks(numel, items, kStepChunk<double>);
    case DType::kBFloat16:
      return step_blocks(numel, items, kStepChunk<__nv_bfloat16>);
    case DType::kFloat16:
      return step_blocks(numel, items, kStepChunk<__half>);
  }
  return 0;
}

cudaError_t launch_fused_step(const StepCall& call, cudaStream_t stream) {
  if (call.rows < 1 || call.rows > kMaxStepRows) {
    return cudaErrorInvalidValue;
  }
  if (call.residuals != nullptr && call.partials == nullptr) {
    return cudaErrorInvalidValue;
  }
  switch (call.dtype) {
    case DType::kFloat32:
      return launch_step<float>(call, stream);
    case DType::kFloat64:
      return launch_step<double>(call, stream);
    case DType::kBFloat16:
      return launch_step<__nv_bfloat16>(call, stream);
    case DType::kFloat16:
      return launch_step<__half>(call, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_check(const CheckItems& items, float* found_inf, cudaStream_t stream) {
  const bool copy = items.dst != nullptr;
  if (!copy && found_inf == nullptr) {
    return cudaErrorInvalidValue;
  }
  void (*kernel)(CheckScalars, CheckTable) =
      !copy ? check_kernel<false, true>
            : (found_inf != nullptr ? check_kernel<true, true> : check_kernel<true, false>);
  CheckScalars s{};
  s.found_inf = found_inf;
  CheckTable table{};
  cudaError_t err = cudaSuccess;
  const PlanStatus status =
      plan_check(items, table, [&](const CheckTable& t, int tensors, uint32_t blocks) {
        s.tensors = tensors;
        kernel<<<blocks, kThreads, 0, stream>>>(s, t);
        err = cudaGetLastError();
        return err == cudaSuccess;
      });
  if (status == PlanStatus::kLaunchFailed) {
    return err;
  }
  return status == PlanStatus::kOk ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace badm_fast::cuda
