// The per-element arithmetic of one fused BADM step, as badm_fast/reference.py::fused_step_
// specifies it (docs/algorithm.md derives it).
//
// Shared by the compiled back ends: the CPU kernel instantiates it with scalars (float, double)
// and with at::vec::Vectorized<float|double>; device code with float and double. Plain C++ (no
// torch headers) so that nvcc compiles it standalone.
//
// Every operation is rounded on its own, in the order written (the contract's order). Host code
// must be compiled without floating-point contraction (setup.py passes -ffp-contract=off); in CUDA
// device code the scalar helpers below use the _rn intrinsics, which are never fused into an FMA.
#pragma once

#if defined(__CUDACC__)
#define BADM_INLINE __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define BADM_INLINE __forceinline
#else
#define BADM_INLINE inline __attribute__((always_inline))
#endif

namespace badm_fast {

// Multiplication, addition and subtraction, each rounded once (never contracted).
template <typename T>
BADM_INLINE T rn_mul(const T& x, const T& y) {
  return x * y;
}
template <typename T>
BADM_INLINE T rn_add(const T& x, const T& y) {
  return x + y;
}
template <typename T>
BADM_INLINE T rn_sub(const T& x, const T& y) {
  return x - y;
}
#if defined(__CUDA_ARCH__)
template <>
BADM_INLINE float rn_mul(const float& x, const float& y) {
  return __fmul_rn(x, y);
}
template <>
BADM_INLINE float rn_add(const float& x, const float& y) {
  return __fadd_rn(x, y);
}
template <>
BADM_INLINE float rn_sub(const float& x, const float& y) {
  return __fsub_rn(x, y);
}
template <>
BADM_INLINE double rn_mul(const double& x, const double& y) {
  return __dmul_rn(x, y);
}
template <>
BADM_INLINE double rn_add(const double& x, const double& y) {
  return __dadd_rn(x, y);
}
template <>
BADM_INLINE double rn_sub(const double& x, const double& y) {
  return __dsub_rn(x, y);
}
#endif

// The step's constants (reference.step_constants) in the arithmetic type T, a scalar or a
// vector of scalars.
template <typename T>
struct StepConstants {
  T a;     // mu                             dual:     pi' = a*pi - b*g
  T b;     // 1 - mu
  T c;     // -2 * lr                        step:     t = c*g + d*pi
  T d;     // (lr * (2*mu - 1)) / (1 - mu)
  T e;     // lr                             residual: l = (g + pi)*e
  T wd;    // weight_decay                   g = g + wd*z   (only with kDecay)
  T sign;  // 1 - 2*maximize                 g = g*sign     (only with kSign)
};

// Derives the constants from hyper = [lr, momentum, weight_decay, maximize] in double, in
// exactly the order of reference.step_constants, then rounds each once to T.
template <typename T>
BADM_INLINE StepConstants<T> step_constants(const double* hyper) {
  const double lr = hyper[0];
  const double mu = hyper[1];
  const double wd = hyper[2];
  const double mx = hyper[3];
  const double one_minus = rn_sub(1.0, mu);
  const double two_mu_minus_one = rn_sub(rn_mul(2.0, mu), 1.0);
  StepConstants<T> k;
  k.a = static_cast<T>(mu);
  k.b = static_cast<T>(one_minus);
  k.c = static_cast<T>(rn_mul(-2.0, lr));
  k.d = static_cast<T>(rn_mul(lr, two_mu_minus_one) / one_minus);
  k.e = static_cast<T>(lr);
  k.wd = static_cast<T>(wd);
  k.sign = static_cast<T>(rn_sub(1.0, rn_mul(2.0, mx)));
  return k;
}

// reference.step_switches: whether the step adds the weight-decay term (weight_decay != 0) and
// negates the gradient (maximize != 0), compared in double. The kernels choose their
// instantiation of badm_row by these once per call or per block of work, never per element.
struct StepSwitches {
  bool decay;
  bool maximize;
};

BADM_INLINE StepSwitches step_switches(const double* hyper) {
  return StepSwitches{hyper[2] != 0.0, hyper[3] != 0.0};
}

// wz = wd*z with kDecay; without it the term is neither computed nor added (T() is unused).
template <bool kDecay, typename T, typename K>
BADM_INLINE T badm_decay_term(const T& z, const K& k) {
  if constexpr (kDecay) {
    return rn_mul(k.wd, z);
  } else {
    (void)z;
    (void)k;
    return T();
  }
}

// One row r at one element, g already widened to T and multiplied by inv_scale when given:
//     [kSign: g = g*sign]; [kDecay: g = g + wz]; pi' = a*pi - b*g; t = c*g + d*pi;
//     delta = delta + alpha*t
// kSign must be set when maximizing; it may be set otherwise too (then sign is 1 and g*1 == g).
// Returns g after the optional updates (the residual needs it); writes pi' to new_pi.
template <bool kDecay, bool kSign, typename T, typename K>
BADM_INLINE T badm_row(T g, const T& pi, const T& wz, const T& alpha, const K& k, T& new_pi,
                       T& delta) {
  if constexpr (kSign) {
    g = rn_mul(g, k.sign);
  }
  if constexpr (kDecay) {
    g = rn_add(g, wz);
  } else {
    (void)wz;
  }
  new_pi = rn_sub(rn_mul(k.a, pi), rn_mul(k.b, g));
  const T t = rn_add(rn_mul(k.c, g), rn_mul(k.d, pi));
  delta = rn_add(delta, rn_mul(alpha, t));
  return g;
}

// The row's primal-residual term, with g as badm_row returns it and pi the old dual:
//     l = (g + pi)*e; prim = prim + (alpha*l)*l
template <typename T, typename K>
BADM_INLINE void badm_row_residual(const T& g, const T& pi, const T& alpha, const K& k, T& prim) {
  const T l = rn_mul(rn_add(g, pi), k.e);
  prim = rn_add(prim, rn_mul(rn_mul(alpha, l), l));
}

}  // namespace badm_fast
