"""Back-end dispatch: which implementation of the fused step runs, chosen once.

Back ends (all compute :func:`badm_fast.reference.fused_step_` exactly):

========  ===========================================================  ==========
name      implementation                                               devices
========  ===========================================================  ==========
triton    ``badm_fast.kernels.badm_step`` (Triton)                      CUDA (CPU under TRITON_INTERPRET=1)
cuda      ``torch.ops.badm_fast.fused_step_ext`` from ``badm_fast._C``  CUDA
cpp       ``torch.ops.badm_fast.fused_step_ext`` from ``badm_fast._C``  CPU
torch     :func:`badm_fast.reference.fused_step_` (plain PyTorch)       any
========  ===========================================================  ==========

``"auto"`` tries, in this fixed order, ``triton, cuda, torch`` on CUDA devices and
``cpp, torch`` on CPU, and logs the first one that is available together with the reasons
the ones before it were not. The environment variable ``BADM_FAST_BACKEND`` replaces
``"auto"``. An explicitly requested back end that is unavailable raises
:class:`BackendUnavailable` with the reason (and the original import error attached).

The capture-safe mode (``BADM(capturable=True)``) needs a kernel that reads rho, sigma and a
skip flag from device memory: only the back ends in :data:`CAPTURABLE` qualify (the extension
op takes rho and sigma as host floats, which a captured CUDA graph would freeze), and "auto"
skips the others.
"""

from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from . import reference

__all__ = ["BACKENDS", "AUTO_ORDER", "CAPTURABLE", "BackendUnavailable", "availability", "resolve", "kernel_for"]

log = logging.getLogger("badm_fast")

BACKENDS = ("triton", "cuda", "cpp", "torch")
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}
ENV_VAR = "BADM_FAST_BACKEND"
# Back ends with a capture-safe form (badm_fast.capture.flagged_kernel_for).
CAPTURABLE = ("triton", "torch")


class BackendUnavailable(RuntimeError):
    """An explicitly requested back end cannot run here; the message says why."""


def _load_extension():
    """Import the compiled extension; returns (module, None) or (None, exception)."""
    try:
        from . import _C  # noqa: F401

        return _C, None
    except Exception as exc:  # ImportError, or an undefined-symbol OSError after a torch upgrade
        return None, exc


def _extension_diagnosis(exc: BaseException) -> str:
    return (
        f"the compiled extension badm_fast._C could not be imported ({type(exc).__name__}: {exc}). "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}). Rebuild it against this torch with "
        "`pip install --no-build-isolation -e .` (unset BADM_FAST_NO_EXTENSION); "
        "`python -m badm_fast.env` prints a full report"
    )


def _has_kernel(dispatch_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("badm_fast::fused_step_ext", dispatch_key)


def availability(name: str, device_type: str, capturable: bool = False) -> tuple[bool, str, BaseException | None]:
    """Whether back end ``name`` can run on ``device_type`` (in the capture-safe mode when
    ``capturable``); ``(ok, reason, exception)``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if capturable and name not in CAPTURABLE:
        return (
            False,
            f"capturable=True needs a kernel that reads rho, sigma and the skip flag from device memory "
            f"(backends {CAPTURABLE}); {name!r} runs badm_fast::fused_step_ext, which takes rho and sigma as "
            "host floats that a captured CUDA graph would freeze",
            None,
        )
    if name == "torch":
        return True, "plain PyTorch reference", None
    if name in ("cpp", "cuda"):
        want = "cpu" if name == "cpp" else "cuda"
        if device_type != want:
            return False, f"backend {name!r} runs on {want} tensors, not {device_type}", None
        mod, exc = _load_extension()
        if mod is None:
            return False, _extension_diagnosis(exc), exc
        if not _has_kernel(want.upper()):
            why = "built without CUDA (the installed torch had no CUDA at build time)" if want == "cuda" else ""
            return False, f"badm_fast._C has no {want.upper()} kernel {why}".strip(), None
        return True, f"badm_fast._C {want.upper()} kernel", None
    # triton
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type != "cuda" and not (device_type == "cpu" and interpret):
        return False, "backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)", None
    try:
        from badm_fast import kernels

        kernels.require_triton()
    except Exception as exc:
        return False, f"Triton is not usable ({type(exc).__name__}: {exc}); `pip install 'triton>=3.2,<3.10'`", exc
    return True, "Triton kernel" + (" (interpreter)" if interpret else ""), None


def resolve(requested: str, device_type: str, capturable: bool = False) -> str:
    """The back end that runs for ``requested`` ("auto" or a name) on ``device_type``
    (among :data:`CAPTURABLE` when ``capturable``)."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested != "auto" and requested not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={requested!r} is not a backend; choose one of {('auto',) + BACKENDS}")
    if requested != "auto":
        ok, reason, exc = availability(requested, device_type, capturable)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} is unavailable on {device_type}: {reason}") from exc
        return requested
    order = AUTO_ORDER.get(device_type, ("torch",))
    skipped = []
    for name in order:
        ok, reason, _ = availability(name, device_type, capturable)
        if ok:
            if skipped:
                log.info("badm_fast: using backend %r on %s; skipped %s", name, device_type, "; ".join(skipped))
            return name
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailable(f"no backend available on {device_type}: " + "; ".join(skipped))  # unreachable: torch


def kernel_for(name: str) -> Callable[..., None]:
    """The function computing the fused step for back end ``name`` (the kernel contract)."""
    if name == "torch":
        return reference.fused_step_
    if name in ("cpp", "cuda"):
        _load_extension()
        return torch.ops.badm_fast.fused_step_ext
    if name == "triton":
        from badm_fast.kernels import badm_step

        return badm_step
    raise ValueError(f"unknown backend {name!r}")
