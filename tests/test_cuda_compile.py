"""The CUDA sources compile standalone with nvcc for sm_90 (compile only), and their launch tables pack correctly.

The kernel source (csrc/cuda/*.cu) holds no torch headers, so this needs only the CUDA toolkit, not a CUDA build of
torch nor a GPU; the nvcc tests are skipped, with the reason, when nvcc is not on PATH. They compile with the flags
of the build (setup.py: ``-O3 --fmad=false``), plainly and with the defines torch's CUDAExtension adds, and parse
ptxas' resource report (``-Xptxas=-v``): no kernel may spill or use a stack frame. A PTX check shows that the source
itself leaves nothing to contract: every float add, subtract and multiply is explicitly rounded (``.rn``), which
ptxas never fuses into a multiply-add, even without ``--fmad=false``. The table packing (csrc/cuda/badm_tables.h) is
plain C++: tests/cuda_tables_check.cpp is built with the host compiler and run.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
KERNEL_SOURCE = os.path.join(CUDA_DIR, "badm_kernel.cu")
TABLES_CHECK = os.path.join(ROOT, "tests", "cuda_tables_check.cpp")

NVCC_FLAGS = ["-std=c++17", "-arch=sm_90", "-O3", "--fmad=false"]
# What torch.utils.cpp_extension.CUDAExtension adds to every nvcc command.
TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
# Entry points of badm_kernel.cu: the step for 4 dtypes with and without residuals, the residual reduction, the
# check and the two copies.
EXPECTED_KERNELS = {"fused_step_kernel": 8, "reduce_residuals_kernel": 1, "check_kernel": 3}


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to run this compile-only check)")
    return nvcc


def parse_ptxas_report(text: str) -> dict[str, dict[str, int]]:
    """Per entry function of a ``-Xptxas=-v`` report: registers, stack frame and spill bytes."""
    report: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = m.group(1)
            report[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[current]["registers"] = int(m.group(1))
    return report


def test_parse_ptxas_report():
    text = (
        "ptxas info    : Compiling entry function '_Z1kv' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kv\n"
        "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 42 registers, used 1 barriers\n"
    )
    assert parse_ptxas_report(text) == {"_Z1kv": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 42}}


def test_there_are_cuda_sources():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"
    assert KERNEL_SOURCE in CU_SOURCES


@pytest.mark.parametrize("torch_flags", [False, True], ids=["plain", "torch-flags"])
@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_nvcc_compiles_without_spills(source, torch_flags, tmp_path):
    nvcc = _nvcc()
    obj = tmp_path / (os.path.basename(source) + ".o")
    flags = NVCC_FLAGS + (TORCH_NVCC_FLAGS if torch_flags else [])
    cmd = [nvcc, "-c", *flags, "-Xptxas=-v", source, "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    assert obj.exists() and obj.stat().st_size > 0
    report = parse_ptxas_report(proc.stderr)
    assert report, f"no ptxas report in:\n{proc.stderr}"
    for name, info in sorted(report.items()):
        print(f"{name}: {info}")
        assert set(info) == {"registers", "stack", "spill_stores", "spill_loads"}, (name, info)
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{name} spills: {info}"
        assert info["stack"] == 0, f"{name} uses a stack frame (a local copy of its arguments?): {info}"
    if source == KERNEL_SOURCE:
        for kernel, count in EXPECTED_KERNELS.items():
            found = [name for name in report if kernel in name]
            assert len(found) == count, f"expected {count} instances of {kernel}, got {found}"


def _ptx_functions(ptx: str) -> dict[str, str]:
    """The body of every ``.entry`` and ``.func`` of a PTX file, by name."""
    bodies: dict[str, str] = {}
    for m in re.finditer(r"\.(?:entry|func)\s+(?:\([^)]*\)\s*)?([\w$]+)\s*\(", ptx):
        start = ptx.find("{", m.end())
        depth = 0
        for i in range(start, len(ptx)):
            if ptx[i] == "{":
                depth += 1
            elif ptx[i] == "}":
                depth -= 1
                if depth == 0:
                    bodies[m.group(1)] = ptx[start : i + 1]
                    break
    return bodies


def test_step_arithmetic_is_explicitly_rounded(tmp_path):
    """Compiled *without* --fmad=false: the source alone must leave nothing that ptxas could contract."""
    nvcc = _nvcc()
    ptx_path = tmp_path / "badm_kernel.ptx"
    flags = [f for f in NVCC_FLAGS if f != "--fmad=false"]
    cmd = [nvcc, "-ptx", *flags, KERNEL_SOURCE, "-o", str(ptx_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    bodies = _ptx_functions(ptx_path.read_text())
    step = {name: body for name, body in bodies.items() if "fused_step_kernel" in name or "reduce_residuals" in name}
    assert len(step) == 9, sorted(bodies)
    for name, body in step.items():
        assert not re.search(r"\bfma\.", body), f"{name} has a fused multiply-add"
        contractible = re.findall(r"\b(?:mul|add|sub)\.f(?:32|64)\b", body)  # no rounding modifier
        assert not contractible, f"{name} has contractible arithmetic: {sorted(set(contractible))}"
        assert re.search(r"\b(?:mul|add)\.rn\.f(?:32|64)\b", body), f"{name}: no explicitly rounded arithmetic found"


def test_launch_tables_pack(tmp_path):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (set CXX)")
    exe = tmp_path / "cuda_tables_check"
    cmd = [cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{CUDA_DIR}", TABLES_CHECK, "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, f"table packing check failed:\n{run.stderr}"
    assert run.stdout.startswith("ok"), run.stdout
