// The per-element arithmetic of one fused BADM step (docs/algorithm.md, "Fused form").
//
// Shared by every compiled back end: the CPU kernel instantiates it with scalars (float,
// double) and with at::vec::Vectorized<float|double>; the CUDA kernel with float and double.
// Plain C++ (no torch headers) so that nvcc compiles it standalone.
#pragma once

#if defined(__CUDACC__)
#define BADM_INLINE __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define BADM_INLINE __forceinline
#else
#define BADM_INLINE inline __attribute__((always_inline))
#endif

namespace badm_fast {

// The step's constants in the arithmetic type T (a scalar or a vector of scalars). Derived
// quantities are computed once per call in double and rounded to the arithmetic type, as the
// PyTorch reference does with its Python-float hyperparameters.
template <typename T>
struct BadmConstants {
  T rho;              // proximal coefficient, rho >= 0
  T sigma;            // penalty, sigma > 0
  T c;                // 1 / (rho + sigma)
  T minus_two_c;      // -2 / (rho + sigma)
  T rho_minus_sigma;  // rho - sigma
  T c_over_sigma;     // 1 / (sigma (rho + sigma))
};

template <typename T>
BADM_INLINE BadmConstants<T> badm_constants(double rho, double sigma) {
  const double c = 1.0 / (rho + sigma);
  return {static_cast<T>(rho),      static_cast<T>(sigma),       static_cast<T>(c),
          static_cast<T>(-2.0 * c), static_cast<T>(rho - sigma), static_cast<T>(c / sigma)};
}

// One sub-batch s at one element, with g = g_s (the gradient of sub-batch s at z) and
// pi = pi_s (its old dual):
//     pi_s'    = (rho pi_s - sigma g_s) / (rho + sigma)
//     z_term_s = -2 g_s / (rho + sigma) + (rho - sigma) pi_s / (sigma (rho + sigma))
// and the caller forms z' = z + sum_s alpha_s z_term_s.
template <typename T>
BADM_INLINE void badm_element(const T& g, const T& pi, const BadmConstants<T>& k, T& new_pi,
                              T& z_term) {
  new_pi = (k.rho * pi - k.sigma * g) * k.c;
  z_term = k.minus_two_c * g + k.rho_minus_sigma * pi * k.c_over_sigma;
}

// The local solution's offset from z, up to sign: z - w_s' = (g_s + pi_s) / (rho + sigma).
// Its alpha-weighted square, summed over elements, is the primal residual.
template <typename T>
BADM_INLINE T badm_local_offset(const T& g, const T& pi, const BadmConstants<T>& k) {
  return (g + pi) * k.c;
}

}  // namespace badm_fast
