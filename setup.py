"""Build and install badm_fast, with its optional compiled extension ``badm_fast._C``.

The package's metadata (name, version, dependencies, the ``badm-train`` script) lives in
``pyproject.toml``, the version in ``badm_fast/_version.py``; this file adds what the build
computes: the packages and the extension. Install into an environment that already has torch
(the extension is compiled against it)::

    pip install --no-build-isolation --use-pep517 -e .   # editable, the extension built in place
    pip install --no-build-isolation .                   # regular install
    python setup.py sdist                                # source archive (needs no torch)

A build that cannot import torch (``pip install .`` with pip's default build isolation, which
hides the installed torch) installs the pure-Python package and says so in the build log; with
``BADM_FAST_REQUIRE_EXTENSION=1`` it fails instead.

What gets built:

* ``badm_fast`` (the Python package: the optimizer, and the ``badm-train`` application in its
  subpackage ``badm_fast.train``) and ``badm_fast.kernels`` (the Triton kernels, taken from the
  top-level ``kernels/`` folder) always.
* ``badm_fast._C``: the C++ CPU kernel (``csrc/*.cpp``) wherever a C++ compiler is found, plus
  the CUDA kernel (``csrc/cuda/*.cu``, ``csrc/cuda/*.cpp``) when the installed torch is a CUDA
  build and the CUDA toolkit (``CUDA_HOME`` or ``nvcc`` on PATH) is found. Otherwise the CUDA
  sources are skipped with one notice; a missing CUDA never fails the install.

Environment switches:

``BADM_FAST_NO_EXTENSION=1``
    Pure-Python install: no compiled extension at all (back ends "torch" and "triton" only).
``BADM_FAST_REQUIRE_EXTENSION=1``
    Fail when ``badm_fast._C`` cannot be built (no torch importable, no C++ compiler) instead of
    installing the pure-Python package.
``BADM_FAST_FORCE_CUDA=1``
    Require the CUDA kernel: fail with the reason if it cannot be built, instead of skipping
    it. ``BADM_FAST_FORCE_CUDA=0`` never builds it. Unset: build it when possible.
``BADM_FAST_CUDA_ARCH_LIST``
    GPU architectures of the CUDA build, in the format of torch's ``TORCH_CUDA_ARCH_LIST`` (to
    which it is copied). Default: ``TORCH_CUDA_ARCH_LIST`` if set, else ``"8.0;9.0+PTX"``: machine code
    for sm_80 and sm_90 and the PTX of sm_90, which the driver compiles for newer GPUs when the
    extension is first loaded there.
``MAX_JOBS``
    Number of parallel compile jobs (read by torch's BuildExtension; default: all cores).
``CXX``
    The C++ compiler (default ``c++``).

The extension is compiled with ``-O3 -g0`` (no debug info roughly halves the build time),
without fast-math and with ``-ffp-contract=off`` (IEEE arithmetic with every operation rounded
on its own and no fused multiply-add, as the reference; the CUDA kernel likewise with
``--fmad=false``), in the C++ standard torch's
BuildExtension selects for the installed torch (C++20 for torch 2.13, C++17 for older ones),
and with OpenMP so that ``at::parallel_for`` uses torch's thread pool. On x86-64 with GCC the CPU kernel is compiled
for three instruction sets (baseline, AVX2, AVX-512) and picks at run time the one that torch
uses (``torch.backends.cpu.get_cpu_capability()``, overridable with ``ATEN_CPU_CAPABILITY``).
"""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
NAME = "badm_fast"

# setup.py commands that compile or install: only these plan the extension (and import torch);
# the others (sdist, egg_info, dist_info, --version, ...) describe or pack the sources.
_BUILD_COMMANDS = {"build", "build_ext", "bdist", "bdist_wheel", "bdist_egg", "editable_wheel", "develop", "install"}


def _env_flag(name: str) -> bool | None:
    """True / False for 1/0 (yes/no, true/false, on/off), None when unset or empty."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"setup.py: {name}={os.environ[name]!r} is not a boolean (use 1 or 0)")


_NOTICES: list[str] = []


def _notice(message: str) -> None:
    """Queues a message for the build log; printed once by build_py (pip runs setup.py several times)."""
    _NOTICES.append(message)


class build_py(_build_py):  # noqa: N801  (the setuptools command's name)
    def run(self):
        for message in _NOTICES:
            print(f"badm_fast setup: {message}", file=sys.stderr)
        super().run()


def _rel(pattern: str) -> list[str]:
    """Sorted source paths (relative to the repository root) matching ``pattern``."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _find_cxx() -> str | None:
    if sys.platform == "win32":
        return "cl"  # MSVC is located by setuptools itself
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0])


def _is_gcc(cxx: str) -> bool:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "clang" not in out.lower() and (
        "gcc" in out.lower() or "g++" in out.lower() or "free software" in out.lower()
    )


def _cpu_sources() -> list[str]:
    # binding.cpp and the baseline kernel first: where the linker merges inline functions
    # compiled in several translation units, the first (baseline) copy wins.
    first = ["csrc/binding.cpp", "csrc/badm_cpu_default.cpp"]
    return first + [s for s in _rel("csrc/*.cpp") if s not in first]


def _cuda_plan(torch) -> tuple[bool, str]:
    """(build the CUDA sources?, the reason when not)."""
    from torch.utils.cpp_extension import CUDA_HOME

    force = _env_flag("BADM_FAST_FORCE_CUDA")
    if force is False:
        return False, "BADM_FAST_FORCE_CUDA=0"
    if getattr(torch.version, "hip", None):
        reason = f"torch {torch.__version__} is a ROCm build (the CUDA kernel is not ported to HIP)"
    elif torch.version.cuda is None:
        reason = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None:
        reason = f"no CUDA toolkit found for torch's CUDA {torch.version.cuda} (set CUDA_HOME or put nvcc on PATH)"
    else:
        return True, ""
    if force:
        raise SystemExit(f"setup.py: BADM_FAST_FORCE_CUDA=1 but the CUDA kernel cannot be built: {reason}")
    return False, reason


def _builds(argv: list[str]) -> bool:
    """Whether the command line runs a command that compiles or installs."""
    return any(a in _BUILD_COMMANDS for a in argv)


def _no_extension(reason: str):
    """The pure-Python plan, or the build's failure under BADM_FAST_REQUIRE_EXTENSION=1."""
    if _env_flag("BADM_FAST_REQUIRE_EXTENSION"):
        raise SystemExit(f"setup.py: BADM_FAST_REQUIRE_EXTENSION=1 but badm_fast._C cannot be built: {reason}")
    _notice(f"{reason}: pure-Python install, badm_fast._C is not built")
    return [], {"build_py": build_py}


def _extensions():
    """The ext_modules list and the build_ext command class (empty for a pure-Python install)."""
    if not _builds(sys.argv[1:]):
        return [], {"build_py": build_py}
    if _env_flag("BADM_FAST_NO_EXTENSION"):
        _notice("BADM_FAST_NO_EXTENSION=1: pure-Python install, badm_fast._C is not built")
        return [], {"build_py": build_py}
    cxx = _find_cxx()
    if cxx is None:
        return _no_extension("no C++ compiler found (set CXX)")
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as err:
        return _no_extension(
            f"torch cannot be imported by the build ({err}; pip's build isolation hides the installed torch: "
            "install torch first, then `pip install --no-build-isolation --use-pep517 ...`)"
        )

    sources = _cpu_sources()
    define_macros = []
    if sys.platform == "win32":
        cxx_flags = ["/O2", "/openmp", "/fp:precise"]  # no /fp:contract: no fused multiply-add
        link_flags = []
    else:
        # -ffp-contract=off: no multiply-add contraction anywhere (the AVX2/AVX-512 builds
        # included), every operation rounded on its own as in the reference
        cxx_flags = ["-O3", "-g0", "-ffp-contract=off", "-fopenmp", "-fvisibility=hidden", "-Wno-unknown-pragmas"]
        link_flags = ["-fopenmp"] if sys.platform.startswith("linux") else []
        if sys.platform == "darwin":  # Apple clang has no -fopenmp: parallel_for runs serially
            cxx_flags.remove("-fopenmp")
        if platform.machine().lower() in ("x86_64", "amd64") and _is_gcc(cxx):
            define_macros.append(("BADM_FAST_CPU_ISA_DISPATCH", "1"))
        else:
            _notice("CPU kernel built for the baseline instruction set only (AVX2/AVX-512 builds need GCC on x86-64)")

    with_cuda, reason = _cuda_plan(torch)
    if with_cuda:
        if os.environ.get("BADM_FAST_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["BADM_FAST_CUDA_ARCH_LIST"]
        else:
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu")
        # No contraction into fused multiply-adds: bit-identical to the reference (the kernel
        # also spells every operation with an explicitly rounded intrinsic).
        nvcc_flags = ["-O3", "--fmad=false"]
        ext = CUDAExtension(
            f"{NAME}._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
        arch = os.environ["TORCH_CUDA_ARCH_LIST"]
        _notice(f"building badm_fast._C with the CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST={arch})")
    else:
        _notice(f"CUDA sources skipped: {reason}; building badm_fast._C with the CPU kernel only")
        ext = CppExtension(
            f"{NAME}._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension, "build_py": build_py}


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(include=[NAME, f"{NAME}.*"])
    kernels = [f"{NAME}.kernels"] + [f"{NAME}.kernels.{p}" for p in find_packages(where="kernels")]
    return packages + kernels, {f"{NAME}.kernels": "kernels"}


ext_modules, cmdclass = _extensions()
packages, package_dir = _packages()

# Everything else (name, version, description, dependencies, extras, the badm-train script,
# package data) is declared in pyproject.toml.
setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
