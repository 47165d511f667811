// Bodies of the CPU kernels, compiled once per instruction set.
//
// The including file defines BADM_CPU_ISA (the namespace of this build, e.g. isa_avx2) and, for a
// vector instruction set, CPU_CAPABILITY / CPU_CAPABILITY_<ISA> and the matching compiler
// target before including this header (see badm_cpu_avx2.cpp). It then defines its entry points
// with BADM_DEFINE_ENTRIES(suffix).
//
// fused_step: one pass over memory per work item (a chunk of one tensor). For each step of two
// arithmetic vectors: load the param z, then for every row r load the gradient and dual
// vectors, write the new dual and accumulate delta; finally write z + delta. A scalar loop does
// the tail of the item with the same operations (badm_element.h), so every element gets the
// same bits whichever path computes it. bf16/fp16 storage is widened to float on load and
// rounded to nearest even on store; the arithmetic is float, or double for double storage.
// The optional operations of a row and the residuals are template arguments, chosen once per
// call, so the loops carry no per-element test: kDecay, the weight-decay term
// (reference.step_switches), and kScaled, the two gradient multipliers (inv_scale, then the
// maximize sign). The multipliers share one instantiation: one not in use is exactly 1 (inv is
// set to 1; sign = 1 - 2*0 = 1 without maximize) and g*1 == g for every g (NaN payloads aside),
// so multiplying by it gives the bits of skipping it.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

#include "badm_cpu.h"
#include "badm_element.h"

#ifndef BADM_CPU_ISA
#error "define BADM_CPU_ISA before including badm_cpu_kernel.h"
#endif

namespace badm_fast::cpu::BADM_CPU_ISA {

using at::vec::Vectorized;

// The arithmetic ("compute") type of a storage type.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Loads and stores two arithmetic vectors' worth of scalar_t elements (2 *
// Vectorized<acc>::size()), widening bf16/fp16 to float on load and rounding back on store.
template <typename scalar_t>
struct VecIO {
  using Vec = Vectorized<scalar_t>;
  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
};

template <typename scalar_t>
struct ReducedVecIO {
  using Vec = Vectorized<float>;
  static void load(const scalar_t* p, Vec& a, Vec& b) { at::vec::load_to_float(p, a, b); }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
};

template <>
struct VecIO<c10::BFloat16> : ReducedVecIO<c10::BFloat16> {};
template <>
struct VecIO<c10::Half> : ReducedVecIO<c10::Half> {};

// Runs f(item, index) for every work item: on the calling thread when the call is small (or
// there is one item, or one thread), otherwise split into one contiguous run of items of about
// equal work per thread. Which thread runs an item never changes what the item computes.
template <typename F>
void for_each_item(const WorkItem* items, int64_t n_items, int64_t total_work, const F& f) {
  if (n_items == 0) {
    return;
  }
  const int64_t threads = at::get_num_threads();
  if (n_items == 1 || total_work <= kSerialWork || threads <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n_items; ++i) {
      f(items[i], i);
    }
    return;
  }
  const int64_t parts = std::min(threads, n_items);
  // First item of part p: the first whose work_before reaches p * total_work / parts.
  auto part_begin = [&](int64_t p) -> int64_t {
    if (p >= parts) {
      return n_items;
    }
    // p * total_work / parts without overflow (p < parts <= threads)
    const int64_t bound = total_work / parts * p + total_work % parts * p / parts;
    const WorkItem* it =
        std::lower_bound(items, items + n_items, bound,
                         [](const WorkItem& w, int64_t b) { return w.work_before < b; });
    return static_cast<int64_t>(it - items);
  };
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t end = part_begin(p + 1);
      for (int64_t i = part_begin(p); i < end; ++i) {
        f(items[i], i);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// fused_step

template <typename acc_t>
struct StepContext {
  StepConstants<acc_t> k;
  const acc_t* alpha;  // R weights
  acc_t inv;           // inv_scale, or 1 without it (used only when kScaled)
  int64_t R;
  void* const* slots;
};

// Maximum rows whose weights are gathered on the stack; more rows use a heap buffer.
constexpr int64_t kStackRows = 64;

// One work item. With kResiduals, writes the item's [sum of prim, sum of delta*delta] (float64)
// to res[0], res[1]. kScaled, kDecay: the optional per-row operations (see the top of this file).
template <typename scalar_t, bool kResiduals, bool kScaled, bool kDecay>
void step_item(const StepContext<acc_type<scalar_t>>& cx, const WorkItem& item, double* res) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kW = Vec::size();
  constexpr int64_t kStep = 2 * kW;

  const int64_t R = cx.R;
  void* const* ptrs = cx.slots + item.slot * (1 + 2 * R);
  scalar_t* const z = static_cast<scalar_t*>(ptrs[0]);
  const scalar_t* const* const g = reinterpret_cast<const scalar_t* const*>(ptrs + 1);
  acc_t* const* const d = reinterpret_cast<acc_t* const*>(ptrs + 1 + R);
  const StepConstants<acc_t>& k = cx.k;
  const StepConstants<Vec> kv{Vec(k.a), Vec(k.b),  Vec(k.c),   Vec(k.d),
                              Vec(k.e), Vec(k.wd), Vec(k.sign)};
  const Vec inv_v(cx.inv);
  const acc_t* const alpha = cx.alpha;

  // Residual sums: one float64 accumulator per vector lane (fixed order, no reassociation).
  double lane_prim[kStep];
  double lane_dual[kStep];
  if constexpr (kResiduals) {
    for (int64_t l = 0; l < kStep; ++l) {
      lane_prim[l] = 0.0;
      lane_dual[l] = 0.0;
    }
  }

  int64_t i = item.begin;
  const int64_t end = item.end;
  for (; i + kStep <= end; i += kStep) {
    Vec z0, z1;
    VecIO<scalar_t>::load(z + i, z0, z1);
    const Vec wz0 = badm_decay_term<kDecay>(z0, kv);
    const Vec wz1 = badm_decay_term<kDecay>(z1, kv);
    Vec delta0(acc_t(0)), delta1(acc_t(0));
    Vec prim0(acc_t(0)), prim1(acc_t(0));
    for (int64_t r = 0; r < R; ++r) {
      Vec g0, g1, p0, p1, np0, np1;
      VecIO<scalar_t>::load(g[r] + i, g0, g1);
      VecIO<acc_t>::load(d[r] + i, p0, p1);
      if constexpr (kScaled) {
        g0 = rn_mul(g0, inv_v);
        g1 = rn_mul(g1, inv_v);
      }
      const Vec alpha_r(alpha[r]);
      g0 = badm_row<kDecay, kScaled>(g0, p0, wz0, alpha_r, kv, np0, delta0);
      g1 = badm_row<kDecay, kScaled>(g1, p1, wz1, alpha_r, kv, np1, delta1);
      VecIO<acc_t>::store(d[r] + i, np0, np1);
      if constexpr (kResiduals) {
        badm_row_residual(g0, p0, alpha_r, kv, prim0);
        badm_row_residual(g1, p1, alpha_r, kv, prim1);
      }
    }
    VecIO<scalar_t>::store(z + i, rn_add(z0, delta0), rn_add(z1, delta1));
    if constexpr (kResiduals) {
      acc_t buf_prim[kStep];
      acc_t buf_dual[kStep];
      prim0.store(buf_prim);
      prim1.store(buf_prim + kW);
      rn_mul(delta0, delta0).store(buf_dual);
      rn_mul(delta1, delta1).store(buf_dual + kW);
      for (int64_t l = 0; l < kStep; ++l) {
        lane_prim[l] += static_cast<double>(buf_prim[l]);
        lane_dual[l] += static_cast<double>(buf_dual[l]);
      }
    }
  }
  // Scalar tail: the same operations, one element at a time.
  double tail_prim = 0.0;
  double tail_dual = 0.0;
  for (; i < end; ++i) {
    const acc_t zi = static_cast<acc_t>(z[i]);
    const acc_t wz = badm_decay_term<kDecay>(zi, k);
    acc_t delta = 0;
    acc_t prim = 0;
    for (int64_t r = 0; r < R; ++r) {
      acc_t gi = static_cast<acc_t>(g[r][i]);
      if constexpr (kScaled) {
        gi = rn_mul(gi, cx.inv);
      }
      const acc_t pi = d[r][i];
      acc_t new_pi;
      gi = badm_row<kDecay, kScaled>(gi, pi, wz, alpha[r], k, new_pi, delta);
      d[r][i] = new_pi;
      if constexpr (kResiduals) {
        badm_row_residual(gi, pi, alpha[r], k, prim);
      }
    }
    z[i] = static_cast<scalar_t>(rn_add(zi, delta));
    if constexpr (kResiduals) {
      tail_prim += static_cast<double>(prim);
      tail_dual += static_cast<double>(rn_mul(delta, delta));
    }
  }
  if constexpr (kResiduals) {
    // The lanes summed pairwise in a fixed tree (vectorisable, a short dependency chain).
    static_assert((kStep & (kStep - 1)) == 0, "a power-of-two number of lanes");
    for (int64_t width = kStep / 2; width >= 1; width /= 2) {
      for (int64_t l = 0; l < width; ++l) {
        lane_prim[l] += lane_prim[l + width];
        lane_dual[l] += lane_dual[l + width];
      }
    }
    res[0] = lane_prim[0] + tail_prim;
    res[1] = lane_dual[0] + tail_dual;
  }
}

template <typename scalar_t, bool kResiduals, bool kScaled, bool kDecay>
void run_step(const StepArgs& a, const StepContext<acc_type<scalar_t>>& cx) {
  for_each_item(a.items, a.n_items, a.total_work, [&](const WorkItem& item, int64_t idx) {
    step_item<scalar_t, kResiduals, kScaled, kDecay>(
        cx, item, kResiduals ? a.partials + 2 * idx : nullptr);
  });
}

// f(std::true_type{}) when b, else f(std::false_type{}): a runtime flag made a template argument.
template <typename F>
void with_flag(bool b, const F& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename scalar_t>
void fused_step(const StepArgs& a) {
  using acc_t = acc_type<scalar_t>;
  if (a.n_items == 0) {
    return;
  }
  // The weights, gathered once (R is small).
  acc_t alpha_stack[kStackRows];
  std::unique_ptr<acc_t[]> alpha_heap;
  acc_t* alpha = alpha_stack;
  if (a.R > kStackRows) {
    alpha_heap.reset(new acc_t[a.R]);
    alpha = alpha_heap.get();
  }
  const auto* w = static_cast<const acc_t*>(a.weights);
  for (int64_t r = 0; r < a.R; ++r) {
    alpha[r] = w[r * a.weight_stride];
  }
  StepContext<acc_t> cx{step_constants<acc_t>(a.hyper), alpha, acc_t(1), a.R, a.slots};
  if (a.inv_scale != nullptr) {
    cx.inv = static_cast<acc_t>(*a.inv_scale);
  }
  // The optional operations, chosen once for the whole call: one instantiation per combination.
  const StepSwitches sw = step_switches(a.hyper);
  with_flag(a.partials != nullptr, [&](auto res) {
    with_flag(a.inv_scale != nullptr || sw.maximize, [&](auto scaled) {
      with_flag(sw.decay, [&](auto decay) {
        constexpr bool kRes = decltype(res)::value;
        constexpr bool kScaled = decltype(scaled)::value;
        constexpr bool kDecay = decltype(decay)::value;
        run_step<scalar_t, kRes, kScaled, kDecay>(a, cx);
      });
    });
  });
}

// Runs the step for the storage dtype of `a`; false for a dtype without a kernel (the caller
// has validated the dtype and reports the error: no error machinery is compiled here for the
// wider instruction sets).
inline bool dispatch_step(const StepArgs& a) {
  switch (a.dtype) {
    case c10::ScalarType::Float:
      fused_step<float>(a);
      return true;
    case c10::ScalarType::Double:
      fused_step<double>(a);
      return true;
    case c10::ScalarType::BFloat16:
      fused_step<c10::BFloat16>(a);
      return true;
    case c10::ScalarType::Half:
      fused_step<c10::Half>(a);
      return true;
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------
// nonfinite scan and copy

// Elements [begin, end) of one slot: copied to dst when it is given and, with kCheck, scanned.
// Returns whether a NaN or an infinity was read. x - x is 0 for a finite x and NaN otherwise; the
// lanes accumulate it, so one test per item decides.
template <typename scalar_t, bool kCheck>
bool scan_range(const scalar_t* src, scalar_t* dst, int64_t begin, int64_t end) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kStep = 2 * Vec::size();
  if constexpr (!kCheck) {
    if (end > begin && dst != src) {
      std::memcpy(dst + begin, src + begin, static_cast<size_t>(end - begin) * sizeof(scalar_t));
    }
    return false;
  } else {
    Vec acc0(acc_t(0)), acc1(acc_t(0));
    int64_t i = begin;
    if (dst != nullptr) {
      // Copy the raw elements (bit-exact for every value, NaN payloads included) and scan
      // the widened ones.
      using SVec = Vectorized<scalar_t>;
      constexpr int64_t kRaw = SVec::size();
      static_assert(kStep % kRaw == 0, "a step covers whole storage vectors");
      for (; i + kStep <= end; i += kStep) {
        for (int64_t j = 0; j < kStep; j += kRaw) {
          SVec::loadu(src + i + j).store(dst + i + j);
        }
        Vec x0, x1;
        VecIO<scalar_t>::load(src + i, x0, x1);
        acc0 = acc0 + (x0 - x0);
        acc1 = acc1 + (x1 - x1);
      }
    } else {
      for (; i + kStep <= end; i += kStep) {
        Vec x0, x1;
        VecIO<scalar_t>::load(src + i, x0, x1);
        acc0 = acc0 + (x0 - x0);
        acc1 = acc1 + (x1 - x1);
      }
    }
    acc_t lanes[kStep];
    (acc0 + acc1).store(lanes);
    bool bad = false;
    for (int64_t l = 0; l < Vec::size(); ++l) {
      bad |= lanes[l] != acc_t(0);
    }
    for (; i < end; ++i) {
      const scalar_t v = src[i];
      if (dst != nullptr) {
        dst[i] = v;
      }
      bad |= !std::isfinite(static_cast<acc_t>(v));
    }
    return bad;
  }
}

template <bool kCheck>
bool scan_slot_range(const ScanSlot& s, int64_t begin, int64_t end) {
  switch (s.dtype) {
    case c10::ScalarType::Float:
      return scan_range<float, kCheck>(static_cast<const float*>(s.src), static_cast<float*>(s.dst),
                                       begin, end);
    case c10::ScalarType::Double:
      return scan_range<double, kCheck>(static_cast<const double*>(s.src),
                                        static_cast<double*>(s.dst), begin, end);
    case c10::ScalarType::BFloat16:
      return scan_range<c10::BFloat16, kCheck>(static_cast<const c10::BFloat16*>(s.src),
                                               static_cast<c10::BFloat16*>(s.dst), begin, end);
    case c10::ScalarType::Half:
      return scan_range<c10::Half, kCheck>(static_cast<const c10::Half*>(s.src),
                                           static_cast<c10::Half*>(s.dst), begin, end);
    default: {
      if constexpr (!kCheck) {  // a plain copy of any other dtype, byte by byte
        const size_t size = c10::elementSize(s.dtype);
        if (end > begin && s.dst != s.src) {
          std::memcpy(static_cast<char*>(s.dst) + begin * size,
                      static_cast<const char*>(s.src) + begin * size,
                      static_cast<size_t>(end - begin) * size);
        }
      }
      return false;
    }
  }
}

inline bool scan(const ScanArgs& a) {
  std::atomic<bool> found{false};
  if (a.check) {
    for_each_item(a.items, a.n_items, a.total_work, [&](const WorkItem& item, int64_t) {
      const ScanSlot& s = a.slots[item.slot];
      // Without a copy to finish, the scan stops once any thread has found a value.
      if (s.dst == nullptr && found.load(std::memory_order_relaxed)) {
        return;
      }
      if (scan_slot_range<true>(s, item.begin, item.end)) {
        found.store(true, std::memory_order_relaxed);
      }
    });
  } else {
    for_each_item(a.items, a.n_items, a.total_work, [&](const WorkItem& item, int64_t) {
      scan_slot_range<false>(a.slots[item.slot], item.begin, item.end);
    });
  }
  return found.load();
}

}  // namespace badm_fast::cpu::BADM_CPU_ISA

#define BADM_DEFINE_ENTRIES(suffix)                                                            \
  namespace badm_fast::cpu {                                                                   \
  bool fused_step_##suffix(const StepArgs& args) { return BADM_CPU_ISA::dispatch_step(args); } \
  bool scan_##suffix(const ScanArgs& args) { return BADM_CPU_ISA::scan(args); }                \
  }
