// Launch tables of the multi-tensor CUDA kernels (badm_kernel.cu) and the host code that packs
// them. Plain C++ (no CUDA, no torch headers): tests/test_cuda_compile.py compiles it with the
// host compiler alone and checks the packing.
//
// Where the tables live: in the kernel arguments, by value. A launch carries one fixed-size
// table (with the other arguments at most 4 KiB, the kernel-argument limit of every supported
// toolkit and architecture); when a table is full the call makes another launch. Reasons, against a
// device buffer uploaded per call:
//  * CUDA graph capture records kernel arguments by value, so a replay launches with exactly
//    the table of the captured call. A device buffer would have to be filled by a copy from
//    pinned host memory, and a captured copy re-reads that host memory at every replay: the
//    host buffer would have to stay allocated and unchanged for the graph's lifetime, which
//    the caching host allocator of the supported torch versions does not guarantee. No copy,
//    no host buffer, no allocation, no synchronisation: nothing a replay could invalidate.
//  * The per-block tensor lookup reads the constant bank (kernel arguments), which every
//    thread of a block reads at the same address: a broadcast, no global-memory latency
//    before the first data loads.
//  * The launch count stays small because the table is per tensor, not per block: the chunk
//    table (per block: tensor index, chunk start) is stored run-length encoded, as the first
//    block of each tensor; block b finds its tensor t by a binary search of first_block, and
//    its chunk is b - first_block[t]. One launch covers up to kStepMaxTensors tensors of any
//    size (the grid is their total chunk count), so a model of N tensors needs
//    ceil(N / min(kStepMaxTensors, kStepSlots / (1 + 2R))) step launches, however large its
//    tensors, where a table of one entry per block would need one per few hundred chunks.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define BADM_TABLES_HD __host__ __device__ __forceinline__
#else
#define BADM_TABLES_HD inline
#endif

namespace badm_fast::cuda {

constexpr int kThreads = 256;             // threads per block of the step and check kernels
constexpr int kStepIters = 8;             // iterations of a block over its chunk of the step
constexpr int64_t kMaxGrid = 2147483647;  // gridDim.x limit

// Step table: up to kStepSlots pointers, 1 + 2R per tensor (param, R gradient rows, R dual
// rows), and up to kStepMaxTensors tensors.
constexpr int kStepSlots = 336;
constexpr int kStepMaxTensors = 96;
constexpr int64_t kMaxStepRows = (kStepSlots - 1) / 2;

struct StepTable {
  // Tensor t: ptr[t*(1+2R)] = param, ptr[t*(1+2R) + 1 + r] = gradient row r,
  // ptr[t*(1+2R) + 1 + R + r] = dual row r.
  void* ptr[kStepSlots];
  int64_t numel[kStepMaxTensors];
  // Blocks [first_block[t], first_block[t+1]) process tensor t, one chunk each.
  uint32_t first_block[kStepMaxTensors + 1];
  // 1 when every pointer of tensor t is 16-byte aligned (vector accesses).
  uint8_t vec[kStepMaxTensors];
};

// Check/copy table: tensors as byte ranges.
constexpr int kCheckMaxTensors = 128;
constexpr int kCheckVectors = 4;  // 16-byte vectors per thread per iteration
constexpr int kCheckIters = 8;
constexpr int64_t kCheckChunk = int64_t(kThreads) * kCheckVectors * 16 * kCheckIters;  // bytes

// What a non-finite value looks like in a tensor (complex dtypes as their real type).
enum class FloatKind : uint8_t {
  kNone = 0,
  kFloat32 = 1,
  kFloat64 = 2,
  kBFloat16 = 3,
  kFloat16 = 4
};

// kind byte of a check-table entry: bits 0-2 FloatKind, bits 4-5 log2 of the lane size in bytes
// (the element size, or that of the real part), bit 7 set by the packer when the pointers are
// 16-byte aligned.
constexpr uint8_t kKindVec = 0x80;
constexpr uint8_t make_kind(FloatKind k, int lane_log2) {
  return static_cast<uint8_t>(static_cast<uint8_t>(k) | (lane_log2 << 4));
}
BADM_TABLES_HD constexpr FloatKind kind_float(uint8_t kind) {
  return static_cast<FloatKind>(kind & 0x7);
}
BADM_TABLES_HD constexpr int kind_lane_log2(uint8_t kind) { return (kind >> 4) & 0x3; }

struct CheckTable {
  void* dst[kCheckMaxTensors];  // nullptr entries for the check alone
  const void* src[kCheckMaxTensors];
  int64_t nbytes[kCheckMaxTensors];
  uint32_t first_block[kCheckMaxTensors + 1];
  uint8_t kind[kCheckMaxTensors];
};

// The kernel arguments, besides the table, are a few pointers and counts; the whole must stay
// under the 4096 bytes every supported architecture and toolkit accepts.
static_assert(sizeof(StepTable) <= 3968,
              "StepTable must leave room for the other kernel arguments");
static_assert(sizeof(CheckTable) <= 3968,
              "CheckTable must leave room for the other kernel arguments");

// Block b's tensor in a launch of `tensors` tensors: the t with
// first_block[t] <= b < first_block[t + 1] (first_block is strictly increasing from 0).
BADM_TABLES_HD int find_tensor(const uint32_t* first_block, int tensors, uint32_t b) {
  int lo = 0;
  int hi = tensors;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (first_block[mid] <= b) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return lo;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t chunks_of(int64_t n, int64_t chunk) { return n <= 0 ? 0 : (n - 1) / chunk + 1; }

enum class PlanStatus { kOk, kTooManyRows, kTooLarge, kLaunchFailed };

// The step items, already filtered (every item has its R gradient rows and numel > 0).
struct StepItems {
  int64_t rows;              // R >= 1
  int64_t items;             // M
  void* const* params;       // [M]
  const void* const* grads;  // [R*M], grads[r*M + m]
  void* const* duals;        // [R*M], duals[r*M + m]
  const int64_t* numel;      // [M]
};

// Total blocks (= residual partials) of all launches of a step; `chunk` in elements.
inline int64_t step_blocks(const int64_t* numel, int64_t items, int64_t chunk) {
  int64_t total = 0;
  for (int64_t m = 0; m < items; ++m) {
    total += chunks_of(numel[m], chunk);
  }
  return total;
}

// Packs the items, in order, into tables and calls
//     launch(const StepTable& table, int tensors, uint32_t blocks, int64_t block_offset) -> bool
// once per full table (false stops the packing: kLaunchFailed). A call over the limits
// (rows, a tensor of more than kMaxGrid chunks) is refused before any launch. block_offset counts
// the blocks of the earlier launches: block b of a launch owns residual partial block_offset + b.
template <typename Launch>
PlanStatus plan_step(const StepItems& in, int64_t chunk, StepTable& table, Launch&& launch) {
  const int64_t stride = 1 + 2 * in.rows;
  if (in.rows < 1 || in.rows > kMaxStepRows) {
    return PlanStatus::kTooManyRows;
  }
  const int64_t by_slots = kStepSlots / stride;
  const int max_tensors = static_cast<int>(by_slots < kStepMaxTensors ? by_slots : kStepMaxTensors);
  for (int64_t m = 0; m < in.items; ++m) {  // refused before anything is launched
    if (chunks_of(in.numel[m], chunk) > kMaxGrid) {
      return PlanStatus::kTooLarge;
    }
  }
  int tensors = 0;
  int64_t blocks = 0;
  int64_t offset = 0;
  for (int64_t m = 0; m < in.items; ++m) {
    const int64_t need = chunks_of(in.numel[m], chunk);
    if (need == 0) {
      continue;
    }
    if (tensors == max_tensors || blocks + need > kMaxGrid) {
      if (!launch(static_cast<const StepTable&>(table), tensors, static_cast<uint32_t>(blocks),
                  offset)) {
        return PlanStatus::kLaunchFailed;
      }
      offset += blocks;
      tensors = 0;
      blocks = 0;
    }
    const int64_t base = tensors * stride;
    bool vec = aligned16(in.params[m]);
    table.ptr[base] = in.params[m];
    for (int64_t r = 0; r < in.rows; ++r) {
      const void* g = in.grads[r * in.items + m];
      void* d = in.duals[r * in.items + m];
      vec = vec && aligned16(g) && aligned16(d);
      table.ptr[base + 1 + r] = const_cast<void*>(g);  // read only by the kernel
      table.ptr[base + 1 + in.rows + r] = d;
    }
    table.numel[tensors] = in.numel[m];
    table.vec[tensors] = vec ? 1 : 0;
    table.first_block[tensors] = static_cast<uint32_t>(blocks);
    blocks += need;
    table.first_block[tensors + 1] = static_cast<uint32_t>(blocks);
    ++tensors;
  }
  if (tensors > 0 && !launch(static_cast<const StepTable&>(table), tensors,
                             static_cast<uint32_t>(blocks), offset)) {
    return PlanStatus::kLaunchFailed;
  }
  return PlanStatus::kOk;
}

// The check/copy items: byte ranges (nbytes > 0 a multiple of the lane size).
struct CheckItems {
  int64_t items;
  void* const* dst;        // [items], or nullptr for the check alone
  const void* const* src;  // [items]
  const int64_t* nbytes;   // [items]
  const uint8_t* kind;     // [items], make_kind(...)
};

// As plan_step, with launch(const CheckTable&, int tensors, uint32_t blocks) -> bool.
template <typename Launch>
PlanStatus plan_check(const CheckItems& in, CheckTable& table, Launch&& launch) {
  for (int64_t m = 0; m < in.items; ++m) {  // refused before anything is launched
    if (chunks_of(in.nbytes[m], kCheckChunk) > kMaxGrid) {
      return PlanStatus::kTooLarge;
    }
  }
  int tensors = 0;
  int64_t blocks = 0;
  for (int64_t m = 0; m < in.items; ++m) {
    const int64_t need = chunks_of(in.nbytes[m], kCheckChunk);
    if (need == 0) {
      continue;
    }
    if (tensors == kCheckMaxTensors || blocks + need > kMaxGrid) {
      if (!launch(static_cast<const CheckTable&>(table), tensors, static_cast<uint32_t>(blocks))) {
        return PlanStatus::kLaunchFailed;
      }
      tensors = 0;
      blocks = 0;
    }
    void* dst = in.dst != nullptr ? in.dst[m] : nullptr;
    const bool vec = aligned16(in.src[m]) && (dst == nullptr || aligned16(dst));
    table.dst[tensors] = dst;
    table.src[tensors] = in.src[m];
    table.nbytes[tensors] = in.nbytes[m];
    table.kind[tensors] = static_cast<uint8_t>((in.kind[m] & ~kKindVec) | (vec ? kKindVec : 0));
    table.first_block[tensors] = static_cast<uint32_t>(blocks);
    blocks += need;
    table.first_block[tensors + 1] = static_cast<uint32_t>(blocks);
    ++tensors;
  }
  if (tensors > 0 &&
      !launch(static_cast<const CheckTable&>(table), tensors, static_cast<uint32_t>(blocks))) {
    return PlanStatus::kLaunchFailed;
  }
  return PlanStatus::kOk;
}

}  // namespace badm_fast::cuda
