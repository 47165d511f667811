// AVX-512 build of the CPU kernel (F, BW, VL, DQ plus FMA: the instruction sets of torch's own
// AVX512 kernels), used when at::get_cpu_capability() reports AVX512. Compiled like
// badm_cpu_avx2.cpp.
#if defined(BADM_FAST_CPU_ISA_DISPATCH)
#include "badm_cpu_isa_prelude.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#include "badm_cpu_avx2_macros.h"
// The same GCC bug for the 512-bit macros (sleef.h declares its 512-bit functions only under
// __AVX512F__).
#ifndef __AVX512F__
#define __AVX512F__ 1
#endif
#ifndef __AVX512BW__
#define __AVX512BW__ 1
#endif
#ifndef __AVX512VL__
#define __AVX512VL__ 1
#endif
#ifndef __AVX512DQ__
#define __AVX512DQ__ 1
#endif

#define CPU_CAPABILITY badm_avx512
#define CPU_CAPABILITY_AVX512
#define BADM_CPU_ISA isa_avx512
#include "badm_cpu_kernel.h"

BADM_DEFINE_ENTRIES(avx512)
#endif
