// Headers that the vectorised kernel depends on but whose code does not depend on the
// instruction set. badm_cpu_avx2.cpp and badm_cpu_avx512.cpp include this file *before*
// switching the compiler target, so that the inline functions defined here (c10, ATen and
// standard-library helpers, shared with the other translation units of the extension) are
// compiled for the baseline instruction set. Only at::vec (whose code lives in the
// per-instruction-set namespace CPU_CAPABILITY) and the kernel itself are compiled for the
// wider target. The default build (badm_cpu_default.cpp) is listed first at link time, so
// that baseline copies win wherever the linker merges inline functions.
#pragma once

#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>
#include <torch/headeronly/cpu/vec/intrinsics.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <ostream>
#include <tuple>
#include <type_traits>
#include <vector>
// Not sleef.h: its declarations depend on the target (__AVX2__ ...); it holds no code.
