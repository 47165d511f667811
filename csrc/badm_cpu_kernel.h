// Body of the CPU kernel, compiled once per instruction set.
//
// The including file defines BADM_CPU_ISA (the namespace of this build, e.g. isa_avx2) and, for a
// vector instruction set, CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and the matching compiler
// target before including this header (see badm_cpu_avx2.cpp). It then defines its entry point
// with BADM_DEFINE_ENTRY(name).
//
// Loop structure (one pass over memory): the P elements are cut into chunks of kChunk; threads
// take contiguous runs of chunks. Within a chunk, for each step of two arithmetic vectors: load
// z, then for every sub-batch s load the gradient and dual vectors, write the new dual and
// accumulate alpha_s * z_term_s; finally write z. A scalar loop does the tail of the chunk.
// Reduced-precision storage (bf16, fp16) is widened to float vectors on load and rounded
// (to nearest even) on store; the arithmetic is float, or double for double storage.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <vector>

#include "badm_cpu.h"
#include "badm_element.h"

#ifndef BADM_CPU_ISA
#error "define BADM_CPU_ISA before including badm_cpu_kernel.h"
#endif

namespace badm_fast::cpu::BADM_CPU_ISA {

using at::vec::Vectorized;

// The arithmetic ("compute") type of a storage type.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Loads and stores two arithmetic vectors' worth of scalar_t elements (2 *
// Vectorized<acc>::size()), widening bf16/fp16 to float on load and rounding back on store.
template <typename scalar_t>
struct VecIO {
  using Vec = Vectorized<scalar_t>;
  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <typename scalar_t>
struct ReducedVecIO {
  using Vec = Vectorized<float>;
  static void load(const scalar_t* p, Vec& a, Vec& b) { at::vec::load_to_float(p, a, b); }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};

template <>
struct VecIO<c10::BFloat16> : ReducedVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : ReducedVecIO<c10::Half> {};

template <typename T>
BadmConstants<Vectorized<T>> broadcast(const BadmConstants<T>& k) {
  using Vec = Vectorized<T>;
  return {Vec(k.rho),         Vec(k.sigma),           Vec(k.c),
          Vec(k.minus_two_c), Vec(k.rho_minus_sigma), Vec(k.c_over_sigma)};
}

// One chunk [begin, end) of the step. With kResiduals, adds this chunk's two residual sums
// (primal: sum_s alpha_s (z - w_s')^2, dual: (z' - z)^2) to res[0], res[1] in double.
template <typename scalar_t, bool kResiduals>
void step_chunk(const StepArgs& a, const acc_type<scalar_t>* alpha, int64_t begin, int64_t end,
                double* res) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kStep = 2 * Vec::size();

  auto* z = static_cast<scalar_t*>(a.z);
  const auto* grads = static_cast<const scalar_t*>(a.grads);
  auto* duals = static_cast<acc_t*>(a.duals);
  const int64_t S = a.S;
  const BadmConstants<acc_t> k = badm_constants<acc_t>(a.rho, a.sigma);
  const BadmConstants<Vec> kv = broadcast(k);

  double primal = 0.0;
  double dual = 0.0;
  int64_t i = begin;
  for (; i + kStep <= end; i += kStep) {
    Vec z0, z1;
    VecIO<scalar_t>::load(z + i, z0, z1);
    Vec delta0(acc_t(0)), delta1(acc_t(0));
    Vec primal0(acc_t(0)), primal1(acc_t(0));
    for (int64_t s = 0; s < S; ++s) {
      const scalar_t* g_row = grads + s * a.grad_row_stride + i;
      acc_t* pi_row = duals + s * a.dual_row_stride + i;
      Vec g0, g1, pi0, pi1, new_pi0, new_pi1, term0, term1;
      VecIO<scalar_t>::load(g_row, g0, g1);
      VecIO<acc_t>::load(pi_row, pi0, pi1);
      badm_element(g0, pi0, kv, new_pi0, term0);
      badm_element(g1, pi1, kv, new_pi1, term1);
      VecIO<acc_t>::store(pi_row, new_pi0, new_pi1);
      const Vec alpha_s(alpha[s]);
      delta0 = at::vec::fmadd(alpha_s, term0, delta0);
      delta1 = at::vec::fmadd(alpha_s, term1, delta1);
      if constexpr (kResiduals) {
        const Vec off0 = badm_local_offset(g0, pi0, kv);
        const Vec off1 = badm_local_offset(g1, pi1, kv);
        primal0 = at::vec::fmadd(alpha_s * off0, off0, primal0);
        primal1 = at::vec::fmadd(alpha_s * off1, off1, primal1);
      }
    }
    VecIO<scalar_t>::store(z + i, z0 + delta0, z1 + delta1);
    if constexpr (kResiduals) {
      primal += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), primal0 + primal1);
      dual += at::vec::vec_reduce_all<acc_t>(std::plus<Vec>(), delta0 * delta0 + delta1 * delta1);
    }
  }
  // Scalar tail: the same arithmetic, one element at a time.
  for (; i < end; ++i) {
    const acc_t zi = static_cast<acc_t>(z[i]);
    acc_t delta = 0;
    acc_t primal_i = 0;
    for (int64_t s = 0; s < S; ++s) {
      const acc_t g = static_cast<acc_t>(grads[s * a.grad_row_stride + i]);
      acc_t& pi = duals[s * a.dual_row_stride + i];
      acc_t new_pi, term;
      badm_element(g, pi, k, new_pi, term);
      if constexpr (kResiduals) {
        const acc_t off = badm_local_offset(g, pi, k);
        primal_i += alpha[s] * off * off;
      }
      pi = new_pi;
      delta += alpha[s] * term;
    }
    z[i] = static_cast<scalar_t>(zi + delta);
    if constexpr (kResiduals) {
      primal += primal_i;
      dual += static_cast<double>(delta) * delta;
    }
  }
  if constexpr (kResiduals) {
    res[0] += primal;
    res[1] += dual;
  }
}

template <typename scalar_t>
void fused_step(const StepArgs& a) {
  using acc_t = acc_type<scalar_t>;
  if (a.P == 0) {
    return;
  }
  // The weights, gathered once (S is small).
  std::vector<acc_t> alpha(a.S);
  const auto* w = static_cast<const acc_t*>(a.weights);
  for (int64_t s = 0; s < a.S; ++s) {
    alpha[s] = w[s * a.weight_stride];
  }
  const int64_t n_chunks = (a.P + kChunk - 1) / kChunk;
  auto chunk_end = [&](int64_t c) { return std::min(a.P, (c + 1) * kChunk); };
  if (a.residuals == nullptr) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      step_chunk<scalar_t, false>(a, alpha.data(), c0 * kChunk, chunk_end(c1 - 1), nullptr);
    });
    return;
  }
  // Residuals: one partial pair per chunk, summed in chunk order afterwards, so the result
  // does not depend on the number of threads.
  std::vector<double> partial(2 * n_chunks, 0.0);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      step_chunk<scalar_t, true>(a, alpha.data(), c * kChunk, chunk_end(c), &partial[2 * c]);
    }
  });
  double primal = 0.0;
  double dual = 0.0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    primal += partial[2 * c];
    dual += partial[2 * c + 1];
  }
  a.residuals[0] += primal;
  a.residuals[a.residual_stride] += dual;
}

// Runs the step for the storage dtype of `a`; false for a dtype without a kernel (the caller
// has validated the dtype and reports the error: no error machinery is compiled here for the
// wider instruction sets).
inline bool dispatch(const StepArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float:
      fused_step<float>(a);
      return true;
    case c10::ScalarType::Double:
      fused_step<double>(a);
      return true;
    case c10::ScalarType::BFloat16:
      fused_step<c10::BFloat16>(a);
      return true;
    case c10::ScalarType::Half:
      fused_step<c10::Half>(a);
      return true;
    default:
      return false;
  }
}

}  // namespace badm_fast::cpu::BADM_CPU_ISA

#define BADM_DEFINE_ENTRY(name)                                            \
  namespace badm_fast::cpu {                                               \
  bool name(const StepArgs& args) { return BADM_CPU_ISA::dispatch(args); } \
  }
