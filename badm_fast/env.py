"""Environment report: ``python -m badm_fast.env``.

Prints the versions that matter, whether the compiled extension loads (and why not), and
which back end ``"auto"`` picks on each device type, with the reasons for the ones skipped.
Paste it into bug reports.
"""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, backends


def report() -> str:
    lines = [
        f"badm_fast {__version__}",
        f"python {platform.python_version()} on {platform.platform()} ({platform.machine()})",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuda available: {torch.cuda.is_available()}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:  # not installed, or broken
        lines.append(f"triton: not importable ({type(exc).__name__}: {exc})")
    try:
        import numpy

        lines.append(f"numpy {numpy.__version__}")
    except ImportError:
        lines.append("numpy: not installed")
    mod, exc = backends._load_extension()
    lines.append(f"badm_fast._C: {'loaded from ' + str(mod.__file__) if mod else 'NOT loaded: ' + repr(exc)}")
    for key in ("BADM_FAST_BACKEND", "TRITON_INTERPRET", "BADM_FAST_NO_EXTENSION"):
        if key in os.environ:
            lines.append(f"{key}={os.environ[key]}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        lines.append(f"back ends on {dev}:")
        for name in backends.AUTO_ORDER.get(dev, ("torch",)):
            ok, reason, _ = backends.availability(name, dev)
            lines.append(f"  {name:7s} {'yes' if ok else 'no '}  {reason}")
        try:
            lines.append(f"  auto -> {backends.resolve('auto', dev)}")
        except Exception as exc:
            lines.append(f"  auto -> error: {exc}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
