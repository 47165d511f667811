// AVX2 + FMA + F16C build of the CPU kernel (the instruction sets of torch's own AVX2 kernels),
// used when at::get_cpu_capability() reports AVX2. The wider target is switched on with a
// pragma after badm_cpu_isa_prelude.h, so that only at::vec and the kernel are compiled for it
// (see that file). setup.py defines BADM_FAST_CPU_ISA_DISPATCH for GCC on x86-64 only.
#if defined(BADM_FAST_CPU_ISA_DISPATCH)
#include "badm_cpu_isa_prelude.h"

#pragma GCC target("avx2,fma,f16c")
// GCC before 14 does not define the target macros after `#pragma GCC target`
// (https://gcc.gnu.org/bugzilla/show_bug.cgi?id=87299); sleef.h, included by at::vec,
// declares its 256-bit functions only under __AVX__/__AVX2__.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

#define CPU_CAPABILITY badm_avx2
#define CPU_CAPABILITY_AVX2
#define BADM_CPU_ISA isa_avx2
#include "badm_cpu_kernel.h"

BADM_DEFINE_ENTRY(fused_step_avx2)
#endif
