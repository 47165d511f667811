// AVX2 + FMA + F16C build of the CPU kernel (the instruction sets of torch's own AVX2 kernels),
// used when at::get_cpu_capability() reports AVX2. The wider target is switched on with a
// pragma after badm_cpu_isa_prelude.h, so that only at::vec and the kernel are compiled for it
// (see that file). setup.py defines BADM_FAST_CPU_ISA_DISPATCH for GCC on x86-64 only.
#if defined(BADM_FAST_CPU_ISA_DISPATCH)
#include "badm_cpu_isa_prelude.h"

#pragma GCC target("avx2,fma,f16c")
#include "badm_cpu_avx2_macros.h"

#define CPU_CAPABILITY badm_avx2
#define CPU_CAPABILITY_AVX2
#define BADM_CPU_ISA isa_avx2
#include "badm_cpu_kernel.h"

BADM_DEFINE_ENTRIES(avx2)
#endif
