// Included right after a `#pragma GCC target` that enables at least avx2,fma,f16c.
// GCC before 14 does not define the target macros after `#pragma GCC target`
// (https://gcc.gnu.org/bugzilla/show_bug.cgi?id=87299); sleef.h, included by at::vec,
// declares its 256-bit functions only under __AVX__/__AVX2__.
#pragma once

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
