// Host-side check of the launch-table packing of the CUDA kernels (csrc/cuda/badm_tables.h),
// built and run by tests/test_cuda_compile.py with the host C++ compiler (no GPU, no CUDA).
//
// On random item lists (sizes around the chunk boundaries, up to more blocks than one grid
// holds; random pointer alignments; every row count) it checks that every launch respects the
// table capacities and the grid limit, that the items come in order, each exactly once, with
// their pointers, sizes and alignment flag, that the blocks of a launch map (through the
// kernels' own find_tensor) onto consecutive chunks covering each tensor exactly, and that the
// residual partial offsets are consecutive and add up to step_blocks(). Prints "ok" and exits
// 0, or prints the failures and exits 1.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

#include "badm_tables.h"

namespace {

using namespace badm_fast::cuda;

int failures = 0;

#define EXPECT(cond)                                                                   \
  do {                                                                                 \
    if (!(cond)) {                                                                     \
      if (failures < 20) {                                                             \
        std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      }                                                                                \
      ++failures;                                                                      \
    }                                                                                  \
  } while (0)

void* fake_ptr(std::mt19937_64& rng, int64_t index) {
  // Distinct addresses; one in four misaligned by a multiple of 2 bytes.
  uintptr_t p = (static_cast<uintptr_t>(index) + 1) << 24;
  if (rng() % 4 == 0) {
    p += 2 * (1 + rng() % 7);
  }
  return reinterpret_cast<void*>(p);
}

int64_t random_size(std::mt19937_64& rng, int64_t chunk) {
  switch (rng() % 8) {
    case 0:
      return 0;
    case 1:
      return 1 + static_cast<int64_t>(rng() % 9);
    case 2:
      return chunk - 1 + static_cast<int64_t>(rng() % 3);
    case 3:
      return chunk * (1 + static_cast<int64_t>(rng() % 5)) - 1 + static_cast<int64_t>(rng() % 3);
    case 4:
      return 1 + static_cast<int64_t>(rng() % (40 * chunk));
    case 5:  // a large tensor (only sizes are stored)
      return static_cast<int64_t>(rng() % (int64_t(1) << 34));
    case 6:  // near the grid limit, so that a launch is split by it
      return rng() % 16 == 0 ? (kMaxGrid / 3) * chunk + static_cast<int64_t>(rng() % chunk) : 7;
    default:
      return 1 + static_cast<int64_t>(rng() % 5000);
  }
}

// Checks the blocks of one launch against first_block and the expected per-tensor chunk
// counts: every block maps to the right tensor, consecutive chunks from 0.
void check_blocks(const uint32_t* first_block, int tensors, uint32_t blocks, std::mt19937_64& rng) {
  EXPECT(first_block[0] == 0);
  for (int t = 0; t < tensors; ++t) {
    EXPECT(first_block[t] < first_block[t + 1]);
  }
  EXPECT(first_block[tensors] == blocks);
  auto check = [&](uint32_t b) {
    const int t = find_tensor(first_block, tensors, b);
    EXPECT(t >= 0 && t < tensors);
    EXPECT(first_block[t] <= b && b < first_block[t + 1]);
  };
  if (blocks <= 20000) {
    for (uint32_t b = 0; b < blocks; ++b) {
      check(b);
    }
  } else {
    for (int t = 0; t < tensors; ++t) {  // the edges of every tensor's range, and samples
      check(first_block[t]);
      check(first_block[t + 1] - 1);
    }
    for (int i = 0; i < 2000; ++i) {
      check(static_cast<uint32_t>(rng() % blocks));
    }
  }
}

void step_case(std::mt19937_64& rng, int64_t rows, int64_t items, int64_t chunk) {
  std::vector<void*> params(items);
  std::vector<const void*> grads(rows * items);
  std::vector<void*> duals(rows * items);
  std::vector<int64_t> numel(items);
  int64_t next_ptr = 0;
  for (int64_t m = 0; m < items; ++m) {
    params[m] = fake_ptr(rng, next_ptr++);
    numel[m] = random_size(rng, chunk);
    for (int64_t r = 0; r < rows; ++r) {
      grads[r * items + m] = fake_ptr(rng, next_ptr++);
      duals[r * items + m] = fake_ptr(rng, next_ptr++);
    }
  }
  bool too_large = false;
  for (int64_t m = 0; m < items; ++m) {
    too_large = too_large || chunks_of(numel[m], chunk) > kMaxGrid;
  }
  const StepItems in{rows, items, params.data(), grads.data(), duals.data(), numel.data()};
  const int64_t stride = 1 + 2 * rows;
  const int64_t max_tensors = std::min<int64_t>(kStepMaxTensors, kStepSlots / stride);
  int64_t expect_item = 0;  // next item with elements
  int64_t expect_offset = 0;
  int launches = 0;
  StepTable table{};
  const PlanStatus status = plan_step(
      in, chunk, table, [&](const StepTable& t, int tensors, uint32_t blocks, int64_t offset) {
        ++launches;
        EXPECT(tensors >= 1 && tensors <= max_tensors);
        EXPECT(tensors * stride <= kStepSlots);
        EXPECT(blocks >= 1 && static_cast<int64_t>(blocks) <= kMaxGrid);
        EXPECT(offset == expect_offset);
        expect_offset += blocks;
        check_blocks(t.first_block, tensors, blocks, rng);
        for (int k = 0; k < tensors; ++k) {
          while (expect_item < items && numel[expect_item] == 0) {
            ++expect_item;
          }
          EXPECT(expect_item < items);
          if (expect_item >= items) {
            return true;
          }
          const int64_t m = expect_item++;
          const int64_t base = k * stride;
          bool aligned = aligned16(params[m]);
          EXPECT(t.ptr[base] == params[m]);
          for (int64_t r = 0; r < rows; ++r) {
            EXPECT(t.ptr[base + 1 + r] == grads[r * items + m]);
            EXPECT(t.ptr[base + 1 + rows + r] == duals[r * items + m]);
            aligned = aligned && aligned16(grads[r * items + m]) && aligned16(duals[r * items + m]);
          }
          EXPECT(t.numel[k] == numel[m]);
          EXPECT(t.vec[k] == (aligned ? 1 : 0));
          EXPECT(t.first_block[k + 1] - t.first_block[k] == chunks_of(numel[m], chunk));
        }
        return true;
      });
  if (too_large) {
    EXPECT(status == PlanStatus::kTooLarge);
    EXPECT(launches == 0);
    return;
  }
  EXPECT(status == PlanStatus::kOk);
  while (expect_item < items && numel[expect_item] == 0) {
    ++expect_item;
  }
  EXPECT(expect_item == items);
  EXPECT(expect_offset == step_blocks(numel.data(), items, chunk));
}

void check_case(std::mt19937_64& rng, int64_t items, bool copy) {
  std::vector<void*> dst(items);
  std::vector<const void*> src(items);
  std::vector<int64_t> nbytes(items);
  std::vector<uint8_t> kind(items);
  for (int64_t m = 0; m < items; ++m) {
    dst[m] = fake_ptr(rng, 2 * m);
    src[m] = fake_ptr(rng, 2 * m + 1);
    const int lane_log2 = static_cast<int>(rng() % 4);
    nbytes[m] = random_size(rng, kCheckChunk) << lane_log2;
    kind[m] = make_kind(static_cast<FloatKind>(rng() % 5), lane_log2);
    if (rng() % 2 == 0) {
      kind[m] |= kKindVec;  // a stale flag: the packer must recompute it
    }
  }
  bool too_large = false;
  for (int64_t m = 0; m < items; ++m) {
    too_large = too_large || chunks_of(nbytes[m], kCheckChunk) > kMaxGrid;
  }
  const CheckItems in{items, copy ? dst.data() : nullptr, src.data(), nbytes.data(), kind.data()};
  int64_t expect_item = 0;
  int launches = 0;
  CheckTable table{};
  const PlanStatus status =
      plan_check(in, table, [&](const CheckTable& t, int tensors, uint32_t blocks) {
        ++launches;
        EXPECT(tensors >= 1 && tensors <= kCheckMaxTensors);
        EXPECT(blocks >= 1 && static_cast<int64_t>(blocks) <= kMaxGrid);
        check_blocks(t.first_block, tensors, blocks, rng);
        for (int k = 0; k < tensors; ++k) {
          while (expect_item < items && nbytes[expect_item] == 0) {
            ++expect_item;
          }
          EXPECT(expect_item < items);
          if (expect_item >= items) {
            return true;
          }
          const int64_t m = expect_item++;
          EXPECT(t.src[k] == src[m]);
          EXPECT(t.dst[k] == (copy ? dst[m] : nullptr));
          EXPECT(t.nbytes[k] == nbytes[m]);
          const bool aligned = aligned16(src[m]) && (!copy || aligned16(dst[m]));
          EXPECT((t.kind[k] & ~kKindVec) == (kind[m] & ~kKindVec));
          EXPECT(((t.kind[k] & kKindVec) != 0) == aligned);
          EXPECT(kind_float(t.kind[k]) == kind_float(kind[m]));
          EXPECT(kind_lane_log2(t.kind[k]) == kind_lane_log2(kind[m]));
          EXPECT(t.first_block[k + 1] - t.first_block[k] == chunks_of(nbytes[m], kCheckChunk));
        }
        return true;
      });
  if (too_large) {
    EXPECT(status == PlanStatus::kTooLarge);
    EXPECT(launches == 0);
    return;
  }
  EXPECT(status == PlanStatus::kOk);
  while (expect_item < items && nbytes[expect_item] == 0) {
    ++expect_item;
  }
  EXPECT(expect_item == items);
}

void limit_cases() {
  void* p = reinterpret_cast<void*>(uintptr_t(1) << 20);
  std::vector<void*> params(1, p);
  std::vector<const void*> grads(kMaxStepRows + 1, p);
  std::vector<void*> duals(kMaxStepRows + 1, p);
  int64_t numel = 10;
  StepTable table{};
  int launches = 0;
  auto count = [&](const StepTable&, int, uint32_t, int64_t) { return ++launches > 0; };
  for (int64_t rows : {int64_t(0), kMaxStepRows + 1}) {
    const StepItems in{rows, 1, params.data(), grads.data(), duals.data(), &numel};
    EXPECT(plan_step(in, 4, table, count) == PlanStatus::kTooManyRows);
  }
  EXPECT(launches == 0);
  const StepItems in{kMaxStepRows, 1, params.data(), grads.data(), duals.data(), &numel};
  EXPECT(plan_step(in, 4, table, count) == PlanStatus::kOk);
  EXPECT(launches == 1);
  // The grid limit, exactly: kMaxGrid blocks fit one launch, one more needs a second.
  for (int64_t extra : {int64_t(5), int64_t(6)}) {
    std::vector<int64_t> two = {kMaxGrid - 5, extra};
    std::vector<void*> two_ptrs(2, p);
    std::vector<const void*> two_grads(2, p);
    const StepItems edge{1, 2, two_ptrs.data(), two_grads.data(), two_ptrs.data(), two.data()};
    std::vector<uint32_t> grid;
    auto record = [&](const StepTable&, int, uint32_t blocks, int64_t) {
      grid.push_back(blocks);
      return true;
    };
    EXPECT(plan_step(edge, 1, table, record) == PlanStatus::kOk);
    if (extra == 5) {
      EXPECT(grid.size() == 1 && grid[0] == kMaxGrid);
    } else {
      EXPECT(grid.size() == 2 && grid[0] == kMaxGrid - 5 && grid[1] == 6);
    }
  }
  // A failing launch stops the packing.
  std::vector<void*> many(300, p);
  std::vector<const void*> many_grads(300, p);
  std::vector<int64_t> sizes(300, 5);
  launches = 0;
  auto fail = [&](const StepTable&, int, uint32_t, int64_t) {
    ++launches;
    return false;
  };
  const StepItems big{1, 300, many.data(), many_grads.data(), many.data(), sizes.data()};
  EXPECT(plan_step(big, 4, table, fail) == PlanStatus::kLaunchFailed);
  EXPECT(launches == 1);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20240701);
  const int64_t rows_choices[] = {1, 2, 3, 4, 8, 16, 33, kMaxStepRows};
  const int64_t chunks[] = {int64_t(kThreads) * 16 * kStepIters, int64_t(kThreads) * 8 * kStepIters,
                            4, 1};
  for (int trial = 0; trial < 3000; ++trial) {
    const int64_t rows =
        trial % 5 == 4 ? 1 + static_cast<int64_t>(rng() % kMaxStepRows) : rows_choices[rng() % 8];
    const int64_t items = static_cast<int64_t>(rng() % (trial % 10 == 0 ? 400 : 40));
    step_case(rng, rows, items, chunks[rng() % 4]);
  }
  for (int trial = 0; trial < 2000; ++trial) {
    check_case(rng, static_cast<int64_t>(rng() % (trial % 10 == 0 ? 600 : 50)), trial % 2 == 0);
  }
  limit_cases();
  if (failures != 0) {
    std::fprintf(stderr, "%d failed expectations\n", failures);
    return 1;
  }
  std::printf("ok sizeof(StepTable)=%zu sizeof(CheckTable)=%zu kMaxStepRows=%lld\n",
              sizeof(StepTable), sizeof(CheckTable), static_cast<long long>(kMaxStepRows));
  return 0;
}
