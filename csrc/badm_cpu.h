// CPU kernels of the badm_fast ops: the arguments they take and their per-instruction-set builds.
//
// The kernel bodies (badm_cpu_kernel.h) are compiled once per instruction set by
// badm_cpu_default.cpp, badm_cpu_avx2.cpp and badm_cpu_avx512.cpp; binding.cpp validates the
// tensors (badm_checks.h), lays out the raw pointers and the work items below and calls the build
// that matches at::get_cpu_capability().
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace badm_fast::cpu {

// Elements per work item: a tensor is cut into chunks of kChunk elements, each chunk one work
// item of at::parallel_for and one residual partial sum (fp32 with R = 4 moves about 900 KiB
// per chunk). Measured with bench/bench_cpp_op.py --chunk-sweep (fused_step_ext with residuals,
// R = 4, fp32, Xeon with AVX-512, a shared 2-core VM at load average 7-14): on one thread,
// chunks of 4K/8K/16K/32K/64K are within noise of each other (64K elements: 59-62 us; 256K:
// 230-266 us; 1000 tensors of 256: 1.24-1.46 ms); on two threads that machine gave no usable
// numbers (most two-thread cases stalled for 8-16 ms per call, at every chunk size, as torch's
// own add_ did at the time). 16K gives a tensor of 64K elements four items, enough to split between
// threads, and keeps the per-item cost (pointer set-up, residual partials) negligible.
#if defined(BADM_FAST_CPU_CHUNK)  // the builds of bench/bench_cpp_op.py --chunk-sweep
constexpr int64_t kChunk = BADM_FAST_CPU_CHUNK;
#else
constexpr int64_t kChunk = 16384;
#endif

// A call whose total work (elements plus kItemCost per item) is at most kSerialWork runs on
// the calling thread, without waking another. Measured on the machine above at a quieter
// moment (one fp32 tensor, R = 1): 32K elements took 7.5 us on one thread and 8.2 us on two,
// 64K elements 13.1 us and 10.8 us.
constexpr int64_t kSerialWork = 32768;

// Fixed cost of one work item in element equivalents (pointer set-up, loop entry and exit), so
// that a list of many tiny tensors is split between threads by its real cost.
constexpr int64_t kItemCost = 64;

// Elements [begin, end) of the tensor (or tensor group) `slot`. work_before: the summed work
// (end - begin + kItemCost) of the items before this one, used to give each thread a contiguous
// run of items of equal work.
struct WorkItem {
  int64_t slot;
  int64_t begin;
  int64_t end;
  int64_t work_before;
};

// Raw view of one fused_step_ext call. All offsets are 64-bit element counts.
struct StepArgs {
  c10::ScalarType dtype;  // storage dtype of params and grads: Float, Double, BFloat16, Half
  int64_t R;              // rows, >= 1
  void* const* slots;     // 1 + 2R pointers per slot: param, grads rows 0..R-1, duals rows 0..R-1
  const WorkItem* items;  // the work items, slot by slot, chunks in order
  int64_t n_items;
  int64_t total_work;      // items[n-1].work_before + its own work
  const double* hyper;     // [lr, momentum, weight_decay, maximize]
  const void* weights;     // (R,) compute dtype (double for Double params, else float)
  int64_t weight_stride;   // elements between consecutive weights
  const float* inv_scale;  // nullptr, or the gradient multiplier
  double* partials;        // nullptr, or 2 * n_items doubles: each item's [primal, dual] sums
};

// One tensor of a nonfinite_check_ext / copy_check_ext call.
struct ScanSlot {
  const void* src;  // the tensor to scan (nonfinite) or to copy from
  void* dst;        // copy_check_ext: the destination (same layout), else nullptr
  c10::ScalarType dtype;
};

struct ScanArgs {
  const ScanSlot* slots;
  const WorkItem* items;
  int64_t n_items;
  int64_t total_work;
  bool check;  // scan the values read for NaN / infinity
};

// One build of each entry point per instruction set. fused_step_*: false when the dtype has no
// kernel (the caller has validated it). scan_*: copies src to dst where dst is given and, with
// args.check, returns whether any value read is a NaN or an infinity.
bool fused_step_default(const StepArgs& args);
bool fused_step_avx2(const StepArgs& args);    // defined only where the build enables it
bool fused_step_avx512(const StepArgs& args);  // defined only where the build enables it
bool scan_default(const ScanArgs& args);
bool scan_avx2(const ScanArgs& args);
bool scan_avx512(const ScanArgs& args);

}  // namespace badm_fast::cpu
