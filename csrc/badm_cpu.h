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
// item of at::parallel_for and one residual partial sum. fp32 with R = 4 moves about 900 KiB
// per chunk.
constexpr int64_t kChunk = 16384;

// A call whose total work (elements plus kItemCost per item) is at most kSerialWork runs on
// the calling thread: waking a second thread costs more than it saves below this size.
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
