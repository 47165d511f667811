// CUDA kernel of the fused BADM step (docs/algorithm.md, "Fused form"), one pass over memory:
// read z, the S gradient rows and the S dual rows; write the S dual rows and z.
//
// Each thread handles N consecutive elements per iteration of a grid-stride loop (64-bit
// indices): N = 16 / sizeof(storage) when every pointer and row stride is 16-byte aligned, so
// that z and each gradient row are read with one 16-byte load and the fp32/fp64 duals with one
// or two; N = 1 (scalar accesses) otherwise. The last P % N elements form a scalar tail.
// Arithmetic in float (double for double storage) via badm_element(); reduced-precision
// results are rounded to nearest even. Optional residuals: per-thread double partial sums,
// reduced per block, one atomicAdd per block and residual.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../badm_element.h"
#include "badm_kernel.h"

namespace badm_fast::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ acc_t<T> to_acc(T x) {
  return static_cast<acc_t<T>>(x);
}
template <>
__device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_acc<__half>(__half x) {
  return __half2float(x);
}

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x) {
  return static_cast<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}

// N elements of T from p into v: 16-byte accesses when N * sizeof(T) is a multiple of 16 (p
// is then 16-byte aligned, checked at launch), element accesses otherwise.
template <int N, typename T>
__device__ __forceinline__ void load(const T* __restrict__ p, T (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPerChunk; ++c) {
      const uint4 bits = reinterpret_cast<const uint4*>(p)[c];
      const T* lanes = reinterpret_cast<const T*>(&bits);
#pragma unroll
      for (int j = 0; j < kPerChunk; ++j) {
        v[c * kPerChunk + j] = lanes[j];
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
__device__ __forceinline__ void store(T* __restrict__ p, const T (&v)[N]) {
  if constexpr (N * sizeof(T) % 16 == 0) {
    constexpr int kPerChunk = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPerChunk; ++c) {
      uint4 bits;
      T* lanes = reinterpret_cast<T*>(&bits);
#pragma unroll
      for (int j = 0; j < kPerChunk; ++j) {
        lanes[j] = v[c * kPerChunk + j];
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

template <typename T>
struct Params {
  T* __restrict__ z;
  const T* __restrict__ grads;
  acc_t<T>* __restrict__ duals;
  const acc_t<T>* __restrict__ weights;
  int64_t P;
  int64_t S;
  int64_t grad_row_stride;
  int64_t dual_row_stride;
  double rho;
  double sigma;
  double* residuals;
  int64_t residual_stride;
};

// Elements [i, i + N) of the step; adds their residual terms to primal and dual.
template <int N, bool kResiduals, typename T>
__device__ __forceinline__ void step_elements(const Params<T>& p, const BadmConstants<acc_t<T>>& k,
                                              int64_t i, double& primal, double& dual) {
  using A = acc_t<T>;
  T z_in[N];
  load<N>(p.z + i, z_in);
  A delta[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    delta[j] = A(0);
  }
  for (int64_t s = 0; s < p.S; ++s) {
    T g_in[N];
    A pi[N];
    load<N>(p.grads + s * p.grad_row_stride + i, g_in);
    load<N>(p.duals + s * p.dual_row_stride + i, pi);
    const A alpha = p.weights[s];
    A new_pi[N];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const A g = to_acc(g_in[j]);
      A z_term;
      badm_element(g, pi[j], k, new_pi[j], z_term);
      delta[j] += alpha * z_term;
      if constexpr (kResiduals) {
        const A off = badm_local_offset(g, pi[j], k);
        primal += static_cast<double>(alpha * off * off);
      }
    }
    store<N>(p.duals + s * p.dual_row_stride + i, new_pi);
  }
  T z_out[N];
#pragma unroll
  for (int j = 0; j < N; ++j) {
    z_out[j] = from_acc<T>(to_acc(z_in[j]) + delta[j]);
    if constexpr (kResiduals) {
      dual += static_cast<double>(delta[j]) * static_cast<double>(delta[j]);
    }
  }
  store<N>(p.z + i, z_out);
}

__device__ __forceinline__ void atomic_add(double* address, double value) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  auto* bits = reinterpret_cast<unsigned long long*>(address);
  unsigned long long old = *bits;
  unsigned long long assumed;
  do {
    assumed = old;
    old = atomicCAS(bits, assumed, __double_as_longlong(value + __longlong_as_double(assumed)));
  } while (assumed != old);
#else
  atomicAdd(address, value);
#endif
}

// Sums v over the block; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
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
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  __syncthreads();
  return v;
}

template <typename T, int N, bool kResiduals>
__global__ void __launch_bounds__(kThreads) badm_fused_step_kernel(const Params<T> p) {
  const BadmConstants<acc_t<T>> k = badm_constants<acc_t<T>>(p.rho, p.sigma);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t n_threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t n_groups = p.P / N;
  double primal = 0.0;
  double dual = 0.0;
  for (int64_t v = tid; v < n_groups; v += n_threads) {
    step_elements<N, kResiduals>(p, k, v * N, primal, dual);
  }
  if constexpr (N > 1) {  // scalar tail: the last P % N elements
    for (int64_t i = n_groups * N + tid; i < p.P; i += n_threads) {
      step_elements<1, kResiduals>(p, k, i, primal, dual);
    }
  }
  if constexpr (kResiduals) {
    __shared__ double partial[kThreads / 32];
    primal = block_sum(primal, partial);
    dual = block_sum(dual, partial);
    if (threadIdx.x == 0) {
      atomic_add(p.residuals, primal);
      atomic_add(p.residuals + p.residual_stride, dual);
    }
  }
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T>
cudaError_t launch(const StepArgs& a, cudaStream_t stream) {
  using A = acc_t<T>;
  Params<T> p{static_cast<T*>(a.z),
              static_cast<const T*>(a.grads),
              static_cast<A*>(a.duals),
              static_cast<const A*>(a.weights),
              a.P,
              a.S,
              a.grad_row_stride,
              a.dual_row_stride,
              a.rho,
              a.sigma,
              a.residuals,
              a.residual_stride};
  constexpr int kVec = 16 / sizeof(T);
  const bool rows_aligned = a.S == 1 || ((a.grad_row_stride * sizeof(T)) % 16 == 0 &&
                                         (a.dual_row_stride * sizeof(A)) % 16 == 0);
  const bool vectorised =
      aligned16(a.z) && aligned16(a.grads) && aligned16(a.duals) && rows_aligned;
  const int64_t groups = vectorised ? (a.P + kVec - 1) / kVec : a.P;

  void (*kernel)(Params<T>);
  if (a.residuals != nullptr) {
    kernel =
        vectorised ? badm_fused_step_kernel<T, kVec, true> : badm_fused_step_kernel<T, 1, true>;
  } else {
    kernel =
        vectorised ? badm_fused_step_kernel<T, kVec, false> : badm_fused_step_kernel<T, 1, false>;
  }

  // As many blocks as can be resident at once on the device (at least one); the grid-stride
  // loop covers the rest.
  int device = 0;
  int sms = 0;
  int blocks_per_sm = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0);
  }
  if (err != cudaSuccess) {
    return err;
  }
  const int64_t resident = static_cast<int64_t>(sms) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t wanted = (groups + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < resident ? wanted : resident);
  kernel<<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_fused_step(const StepArgs& args, cudaStream_t stream) {
  if (args.P == 0) {
    return cudaSuccess;
  }
  switch (args.dtype) {
    case DType::kFloat32:
      return launch<float>(args, stream);
    case DType::kFloat64:
      return launch<double>(args, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(args, stream);
    case DType::kFloat16:
      return launch<__half>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace badm_fast::cuda
