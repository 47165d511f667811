// Baseline build of the CPU kernel: no instruction-set flags beyond the compiler's default,
// so it runs on every CPU that runs torch. at::vec falls back to its portable implementation,
// which the compiler auto-vectorises for the baseline (SSE2 on x86-64, NEON on aarch64).
#define CPU_CAPABILITY badm_default
#define BADM_CPU_ISA isa_default
#include "badm_cpu_kernel.h"

BADM_DEFINE_ENTRIES(default)
