"""The CUDA sources of the extension compile standalone with nvcc for sm_90 (compile only).

The kernel source (csrc/cuda/*.cu) holds no torch headers, so this needs only the CUDA toolkit,
not a CUDA build of torch nor a GPU. Skipped, with the reason, when nvcc is not on PATH.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def test_there_are_cuda_sources():
    assert CU_SOURCES, "no csrc/cuda/*.cu found"


@pytest.mark.parametrize("source", CU_SOURCES, ids=os.path.basename)
def test_nvcc_compiles(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH (install the CUDA toolkit to run this compile-only check)")
    obj = tmp_path / (os.path.basename(source) + ".o")
    cmd = [nvcc, "-c", "-std=c++17", "-arch=sm_90", "-O3", "-Xptxas=-warn-spills", source, "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        print(proc.stderr)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    assert obj.exists() and obj.stat().st_size > 0
    assert "spill" not in proc.stderr.lower(), f"register spills:\n{proc.stderr}"
