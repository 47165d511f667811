"""Packaging: the source distribution carries what the build and the tests need, and a wheel
built from it is complete (metadata from pyproject.toml, one version, py.typed, the script).

``test_sdist_and_wheel`` runs offline in a few seconds (``setup.py sdist``, then a pure-Python
wheel built from the unpacked archive with ``BADM_FAST_NO_EXTENSION=1``); it is not marked slow,
so CI runs it. ``test_extension_builds_from_the_sdist`` compiles ``badm_fast._C`` from the
unpacked archive (marked slow: about 35 s on one core).
"""

from __future__ import annotations

import email.parser
import os
import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what the sdist must hold: every source-tree file matching these patterns (relative to ROOT)
REQUIRED_PATTERNS = [
    "badm_fast/*.py",
    "badm_fast/train/*.py",
    "csrc/**/*.h",
    "csrc/**/*.cpp",
    "csrc/cuda/*",
    "kernels/*.py",
    "tests/*.py",
    "bench/*.py",
    "docs/*.md",
]
REQUIRED_FILES = [
    "README.md",
    "LICENSE",
    "pyproject.toml",
    "setup.py",
    "MANIFEST.in",
    "badm_fast/py.typed",
    "badm_fast/_version.py",
    "badm_fast/train/__init__.py",
    "badm_fast/train/__main__.py",
    "tests/conftest.py",
    "tests/parity.py",
]

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(), reason="not a source checkout")


def _version() -> str:
    text = (ROOT / "badm_fast" / "_version.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1)


def _expected_files() -> set[str]:
    found = set(REQUIRED_FILES)
    for pattern in REQUIRED_PATTERNS:
        matches = [p for p in ROOT.glob(pattern) if p.is_file() and "__pycache__" not in p.parts]
        assert matches, f"{pattern} matches nothing in the source tree"
        found.update(p.relative_to(ROOT).as_posix() for p in matches)
    return found


def _run(cmd: list[str], cwd: Path, **env) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("BADM_FAST_")}
    environ.update(env)
    proc = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _sdist(tmp_path: Path) -> Path:
    """Builds the sdist into ``tmp_path`` (egg-info there too: nothing is written into the checkout)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "sdist", "--dist-dir",
           str(tmp_path)]  # fmt: skip
    _run(cmd, ROOT)
    archives = list(tmp_path.glob("*.tar.gz"))
    assert len(archives) == 1, archives
    return archives[0]


def _unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        if sys.version_info >= (3, 12):
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    (top,) = into.iterdir()
    return top


def test_sdist_and_wheel(tmp_path):
    version = _version()
    archive = _sdist(tmp_path / "dist")
    assert archive.name == f"badm_fast-{version}.tar.gz"
    prefix = f"badm_fast-{version}/"
    with tarfile.open(archive) as tar:
        names = [n for n in tar.getnames()]
        pkg_info = tar.extractfile(prefix + "PKG-INFO").read().decode()
    assert all(n == prefix.rstrip("/") or n.startswith(prefix) for n in names)
    files = {n[len(prefix) :] for n in names if n.startswith(prefix)}
    missing = sorted(_expected_files() - files)
    assert not missing, f"the sdist lacks {missing}"
    junk = sorted(f for f in files if f.endswith((".so", ".pyc", ".pt")) or "__pycache__" in f or ".venv" in f)
    assert not junk, f"the sdist carries build or run outputs: {junk}"

    meta = email.parser.Parser().parsestr(pkg_info)
    assert meta["Name"] == "badm_fast" and meta["Version"] == version
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] == "badm_fast contributors"
    assert meta["Requires-Python"] == ">=3.9"
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("torch") for r in requires) and 'tqdm; extra == "train"' in requires

    # a wheel from the unpacked sdist (pure Python: the extension build is the slow test below)
    source = _unpack(archive, tmp_path / "src")
    wheel_dir = tmp_path / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "--no-index",
           "-w", str(wheel_dir), str(source)]  # fmt: skip
    _run(cmd, tmp_path, BADM_FAST_NO_EXTENSION="1")
    (wheel,) = wheel_dir.glob("*.whl")
    assert wheel.name == f"badm_fast-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        contents = set(zf.namelist())
        info = f"badm_fast-{version}.dist-info/"
        entry_points = zf.read(info + "entry_points.txt").decode()
        wheel_meta = email.parser.Parser().parsestr(zf.read(info + "METADATA").decode())
    package = {p.relative_to(ROOT).as_posix() for p in ROOT.glob("badm_fast/**/*.py") if "__pycache__" not in p.parts}
    for name in sorted(package) + ["badm_fast/py.typed", "badm_fast/kernels/__init__.py",
                                   "badm_fast/kernels/badm_triton.py", info + "licenses/LICENSE"]:  # fmt: skip
        assert name in contents, f"the wheel lacks {name}"
    assert not [n for n in contents if n.startswith(("tests/", "bench/", "csrc/"))]
    assert "badm-train = badm_fast.train:main" in entry_points
    assert wheel_meta["Version"] == version and wheel_meta["License-Expression"] == "MIT"


def test_version_has_one_source():
    import badm_fast

    assert badm_fast.__version__ == _version()
    assert "version" not in re.sub(r"#.*", "", (ROOT / "setup.py").read_text()).split("setup(", 1)[-1]
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and "badm_fast._version.__version__" in pyproject


@pytest.mark.slow
def test_extension_builds_from_the_sdist(tmp_path):
    pytest.importorskip("torch")
    source = _unpack(_sdist(tmp_path / "dist"), tmp_path / "src")
    lib = tmp_path / "lib"
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(lib), "--build-temp",
           str(tmp_path / "tmp")]  # fmt: skip
    _run(cmd, source, MAX_JOBS=os.environ.get("MAX_JOBS", "1"), BADM_FAST_REQUIRE_EXTENSION="1")
    assert list((lib / "badm_fast").glob("_C*.so")) or list((lib / "badm_fast").glob("_C*.pyd"))
