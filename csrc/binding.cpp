// badm_fast._C: defines the ops of the badm_fast library and registers their CPU implementations.
//
//   fused_step_ext(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] duals, Tensor weights,
//                  Tensor hyper, Tensor(c!)? residuals=None, Tensor? found_inf=None,
//                  Tensor? inv_scale=None) -> ()
//   nonfinite_check_ext(Tensor?[] tensors, Tensor(a!) found_inf) -> ()
//   copy_check_ext(Tensor(a!)[] dst, Tensor?[] src, Tensor(b!)? found_inf=None) -> ()
//
// The contract of each op is its counterpart in badm_fast/reference.py (fused_step_,
// nonfinite_check_, copy_check_). The CUDA implementations, when built, live in
// cuda/binding_cuda.cpp; the fake (meta) implementations used by torch.compile are registered
// from Python.
#include <Python.h>  // first, as Python requires

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "badm_checks.h"
#include "badm_cpu.h"

namespace badm_fast {
namespace {

struct CpuKernels {
  bool (*step)(const cpu::StepArgs&);
  bool (*scan)(const cpu::ScanArgs&);
};

// The build of the CPU kernels matching the instruction set torch itself uses for its CPU
// kernels (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY=default|avx2|avx512).
CpuKernels select_cpu_kernels() {
#if defined(BADM_FAST_CPU_ISA_DISPATCH)
  const std::string capability = at::get_cpu_capability();
  if (capability == "AVX512") {
    return {cpu::fused_step_avx512, cpu::scan_avx512};
  }
  if (capability == "AVX2") {
    return {cpu::fused_step_avx2, cpu::scan_avx2};
  }
#endif
  return {cpu::fused_step_default, cpu::scan_default};
}

const CpuKernels& cpu_kernels() {
  static const CpuKernels kernels = select_cpu_kernels();
  return kernels;
}

int64_t n_chunks(int64_t numel) { return (numel + cpu::kChunk - 1) / cpu::kChunk; }

// Appends the work items of slot `slot` (numel elements, cut into chunks of kChunk).
void add_items(std::vector<cpu::WorkItem>& items, int64_t slot, int64_t numel, int64_t& work) {
  for (int64_t begin = 0; begin < numel; begin += cpu::kChunk) {
    const int64_t end = std::min(numel, begin + cpu::kChunk);
    items.push_back({slot, begin, end, work});
    work += end - begin + cpu::kItemCost;
  }
}

// found_inf = max(found_inf, 1) (NaN stays NaN), as reference.nonfinite_check_ on a hit.
void raise_flag(const at::Tensor& found_inf) {
  float* f = found_inf.mutable_data_ptr<float>();
  if (!std::isnan(*f) && !(*f >= 1.0f)) {
    *f = 1.0f;
  }
}

void fused_step_cpu(TensorListView params, TensorListView grads, TensorListView duals,
                    const at::Tensor& weights, const at::Tensor& hyper, const at::Tensor* residuals,
                    const at::Tensor* found_inf, const at::Tensor* inv_scale) {
  const int64_t R = check_fused_step_views(params, grads, duals, weights, hyper, residuals,
                                           found_inf, inv_scale, c10::DeviceType::CPU);
  if (found_inf != nullptr && *found_inf->const_data_ptr<float>() != 0.0f) {
    return;  // a non-finite gradient was found: nothing changes
  }
  const size_t N = params.size();
  int64_t n_slots = 0;
  int64_t n_items = 0;
  for (size_t i = 0; i < N; ++i) {
    const int64_t numel = params.get(i)->numel();
    if (numel > 0 && grads.get(i) != nullptr) {
      ++n_slots;
      n_items += n_chunks(numel);
    }
  }
  if (n_items == 0) {
    return;  // nothing to update, and no residual term (as the reference)
  }

  // Slot s: its param, its R gradient rows and its R dual rows (raw pointers, validated above).
  const int64_t per_slot = 1 + 2 * R;
  std::vector<void*> slots(static_cast<size_t>(n_slots * per_slot));
  std::vector<cpu::WorkItem> items;
  items.reserve(static_cast<size_t>(n_items));
  int64_t work = 0;
  int64_t slot = 0;
  for (size_t i = 0; i < N; ++i) {
    const at::Tensor& p = *params.get(i);
    const int64_t numel = p.numel();
    if (numel == 0 || grads.get(i) == nullptr) {
      continue;
    }
    void** row = slots.data() + slot * per_slot;
    row[0] = p.mutable_data_ptr();
    for (int64_t r = 0; r < R; ++r) {
      const size_t k = static_cast<size_t>(r) * N + i;
      row[1 + r] = const_cast<void*>(grads.get(k)->const_data_ptr());
      row[1 + R + r] = duals.get(k)->mutable_data_ptr();
    }
    add_items(items, slot, numel, work);
    ++slot;
  }

  std::vector<double> partials;
  if (residuals != nullptr) {
    partials.assign(static_cast<size_t>(2 * n_items), 0.0);
  }
  cpu::StepArgs args{};
  args.dtype = params.get(0)->scalar_type();
  args.R = R;
  args.slots = slots.data();
  args.items = items.data();
  args.n_items = n_items;
  args.total_work = work;
  args.hyper = hyper.const_data_ptr<double>();
  args.weights = weights.const_data_ptr();
  args.weight_stride = weights.stride(0);
  args.inv_scale = inv_scale != nullptr ? inv_scale->const_data_ptr<float>() : nullptr;
  args.partials = residuals != nullptr ? partials.data() : nullptr;
  TORCH_CHECK(cpu_kernels().step(args), "badm_fast::fused_step_ext: no CPU kernel for dtype ",
              args.dtype);

  if (residuals != nullptr) {
    // The items' partial sums in item order: the same bits for any number of threads.
    double primal = 0.0;
    double dual = 0.0;
    for (int64_t j = 0; j < n_items; ++j) {
      primal += partials[2 * j];
      dual += partials[2 * j + 1];
    }
    double* res = residuals->mutable_data_ptr<double>();
    res[0] += primal;
    res[residuals->stride(0)] += dual;
  }
}

// Copies src[i] to dst[i] (where dst is given) and scans them; true when a value is not finite.
bool run_scan(TensorListView src, const TensorListView* dst, bool check) {
  int64_t n_slots = 0;
  int64_t n_items = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor* s = src.get(i);
    if (s != nullptr && s->numel() > 0) {
      ++n_slots;
      n_items += n_chunks(s->numel());
    }
  }
  if (n_items == 0) {
    return false;
  }
  std::vector<cpu::ScanSlot> slots;
  slots.reserve(static_cast<size_t>(n_slots));
  std::vector<cpu::WorkItem> items;
  items.reserve(static_cast<size_t>(n_items));
  int64_t work = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor* s = src.get(i);
    if (s == nullptr || s->numel() == 0) {
      continue;
    }
    void* d = dst != nullptr ? dst->get(i)->mutable_data_ptr() : nullptr;
    add_items(items, static_cast<int64_t>(slots.size()), s->numel(), work);
    slots.push_back({s->const_data_ptr(), d, s->scalar_type()});
  }
  cpu::ScanArgs args{};
  args.slots = slots.data();
  args.items = items.data();
  args.n_items = n_items;
  args.total_work = work;
  args.check = check;
  return cpu_kernels().scan(args);
}

void nonfinite_check_cpu(TensorListView tensors, const at::Tensor& found_inf) {
  check_nonfinite_views(tensors, found_inf, c10::DeviceType::CPU);
  if (run_scan(tensors, nullptr, /*check=*/true)) {
    raise_flag(found_inf);
  }
}

void copy_check_cpu(TensorListView dst, TensorListView src, const at::Tensor* found_inf) {
  check_copy_views(dst, src, found_inf, c10::DeviceType::CPU);
  if (run_scan(src, &dst, /*check=*/found_inf != nullptr)) {
    raise_flag(*found_inf);
  }
}

// Boxed kernels. The ops are registered boxed so that the list arguments are read in place
// from the dispatcher's stack: an unboxed kernel would receive every Tensor[] as a fresh
// std::vector<at::Tensor> (one reference-count increment and decrement per tensor).

const at::Tensor* stack_opt(const c10::IValue& v) {
  return v.isTensor() && v.toTensor().defined() ? &v.toTensor() : nullptr;
}

// Pops the n arguments of a call. Each pop releases a reference to every tensor of the lists,
// and for a tensor that has a Python object torch takes the GIL in that release (while C++
// holds references, the tensor keeps its Python object alive: c10::TensorImpl::decref_pyobject).
// A call from Python runs with the GIL released, so on a Python thread that does not hold the
// GIL the pops run under one acquisition of it instead of one per tensor. Other threads (no
// Python thread state) pop as torch would.
void pop_arguments(torch::jit::Stack& stack, size_t n) {
  if (Py_IsInitialized() && PyGILState_GetThisThreadState() != nullptr && !PyGILState_Check()) {
    const PyGILState_STATE gil = PyGILState_Ensure();
    torch::jit::drop(stack, n);
    PyGILState_Release(gil);
  } else {
    torch::jit::drop(stack, n);
  }
}

void fused_step_boxed(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 8;
  const auto a = torch::jit::last(*stack, kArgs);
  fused_step_cpu(a[0].toListRef(), a[1].toListRef(), a[2].toListRef(), a[3].toTensor(),
                 a[4].toTensor(), stack_opt(a[5]), stack_opt(a[6]), stack_opt(a[7]));
  pop_arguments(*stack, kArgs);
}

void nonfinite_check_boxed(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 2;
  const auto a = torch::jit::last(*stack, kArgs);
  nonfinite_check_cpu(a[0].toListRef(), a[1].toTensor());
  pop_arguments(*stack, kArgs);
}

void copy_check_boxed(const c10::OperatorHandle& /*op*/, torch::jit::Stack* stack) {
  constexpr size_t kArgs = 3;
  const auto a = torch::jit::last(*stack, kArgs);
  copy_check_cpu(a[0].toListRef(), a[1].toListRef(), stack_opt(a[2]));
  pop_arguments(*stack, kArgs);
}

}  // namespace
}  // namespace badm_fast

TORCH_LIBRARY(badm_fast, m) {
  m.def(
      "fused_step_ext(Tensor(a!)[] params, Tensor?[] grads, Tensor(b!)[] duals, Tensor weights, "
      "Tensor hyper, Tensor(c!)? residuals=None, Tensor? found_inf=None, Tensor? inv_scale=None) "
      "-> ()");
  m.def("nonfinite_check_ext(Tensor?[] tensors, Tensor(a!) found_inf) -> ()");
  m.def("copy_check_ext(Tensor(a!)[] dst, Tensor?[] src, Tensor(b!)? found_inf=None) -> ()");
}

TORCH_LIBRARY_IMPL(badm_fast, CPU, m) {
  m.impl("fused_step_ext",
         torch::CppFunction::makeFromBoxedFunction<&badm_fast::fused_step_boxed>());
  m.impl("nonfinite_check_ext",
         torch::CppFunction::makeFromBoxedFunction<&badm_fast::nonfinite_check_boxed>());
  m.impl("copy_check_ext",
         torch::CppFunction::makeFromBoxedFunction<&badm_fast::copy_check_boxed>());
}

// `import badm_fast._C` loads this library, which runs the registrations above; the module
// itself is empty (the ops are reached as torch.ops.badm_fast.*).
static struct PyModuleDef badm_fast_c_module = {
    PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of badm_fast (torch.ops.badm_fast).", -1,
    nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&badm_fast_c_module); }
