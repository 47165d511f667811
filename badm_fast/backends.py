"""Back ends: one table of implementations of one kernel contract, chosen once per device type.

Every back end implements the three functions of the contract specified by
:mod:`badm_fast.reference` (``step`` = :func:`~badm_fast.reference.fused_step_`, ``nonfinite`` =
:func:`~badm_fast.reference.nonfinite_check_`, ``copy_check`` = :func:`~badm_fast.reference.copy_check_`)
over lists of tensors, with the hyperparameters in a device tensor:

========  ==============================================================  ==================================
name      implementation                                                  devices
========  ==============================================================  ==================================
triton    ``badm_fast.kernels`` (Triton, one launch per call)              CUDA (CPU under TRITON_INTERPRET=1)
cuda      ``torch.ops.badm_fast.*_ext`` from ``badm_fast._C``              CUDA
cpp       ``torch.ops.badm_fast.*_ext`` from ``badm_fast._C``              CPU
torch     :mod:`badm_fast.reference` (plain PyTorch)                       any
========  ==============================================================  ==================================

``"auto"`` tries, in the fixed order of :data:`AUTO_ORDER`, ``triton, cuda, torch`` on CUDA devices
and ``cpp, torch`` on CPU, and logs the first one that is available together with the reasons the
ones before it were not. The environment variable ``BADM_FAST_BACKEND`` replaces ``"auto"``. An
explicitly requested back end that is unavailable raises :class:`BackendUnavailable` with the
reason (and the original import error attached).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch

from . import reference

__all__ = ["BACKENDS", "AUTO_ORDER", "Backend", "BackendUnavailable", "TABLE", "availability", "get", "resolve"]

log = logging.getLogger("badm_fast")

ENV_VAR = "BADM_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested back end cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of the kernel contract.

    Attributes:
        name: the name users pass as ``backend=``.
        devices: device types it runs on.
        probe: ``probe(device_type) -> (ok, reason, exception)``.
        step, nonfinite, copy_check: the contract's functions (resolved lazily, on first use).
    """

    name: str
    devices: tuple[str, ...]
    probe: Callable[[str], tuple[bool, str, BaseException | None]]
    load: Callable[[], tuple[Callable[..., None], Callable[..., None], Callable[..., None]]]

    def functions(self) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
        """``(step, nonfinite, copy_check)``."""
        return self.load()


# ------------------------------------------------------------------------------ the compiled extension
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
        "`pip install --no-build-isolation --use-pep517 -e .` (unset BADM_FAST_NO_EXTENSION); "
        "`python -m badm_fast.env` prints a full report"
    )


def _has_kernel(op: str, dispatch_key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"badm_fast::{op}", dispatch_key)
    except RuntimeError:  # the op is not registered at all
        return False


def _extension_probe(want: str) -> Callable[[str], tuple[bool, str, BaseException | None]]:
    name = "cpp" if want == "cpu" else "cuda"

    def probe(device_type: str):
        if device_type != want:
            return False, f"backend {name!r} runs on {want} tensors, not {device_type}", None
        mod, exc = _load_extension()
        if mod is None:
            return False, _extension_diagnosis(exc), exc
        key = want.upper()
        if not all(_has_kernel(op, key) for op in ("fused_step_ext", "nonfinite_check_ext", "copy_check_ext")):
            why = " (built without CUDA: the installed torch had no CUDA at build time)" if want == "cuda" else ""
            return False, f"badm_fast._C has no {key} kernels{why}", None
        return True, f"badm_fast._C {key} kernel", None

    return probe


def _extension_functions():
    _load_extension()
    from . import _ops

    _ops.register_extension_fakes()
    ops = torch.ops.badm_fast
    return ops.fused_step_ext, ops.nonfinite_check_ext, ops.copy_check_ext


# ------------------------------------------------------------------------------ triton
def _triton_probe(device_type: str):
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type != "cuda" and not (device_type == "cpu" and interpret):
        return False, "backend 'triton' runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)", None
    try:
        from badm_fast import kernels

        kernels.require_triton()
    except Exception as exc:
        return False, f"Triton is not usable ({type(exc).__name__}: {exc}); `pip install 'triton>=3.2,<3.10'`", exc
    return True, "Triton kernel" + (" (interpreter)" if interpret else ""), None


def _triton_functions():
    from badm_fast import kernels

    def step(params, grads, duals, weights, hyper, residuals=None, found_inf=None, inv_scale=None):
        kernels.badm_step(params, grads, duals, weights, hyper, residuals, found_inf=found_inf, inv_scale=inv_scale)

    return step, kernels.badm_nonfinite_check, kernels.badm_copy_check


def _torch_functions():
    return reference.fused_step_, reference.nonfinite_check_, reference.copy_check_


TABLE: dict[str, Backend] = {
    "triton": Backend("triton", ("cuda", "cpu"), _triton_probe, _triton_functions),
    "cuda": Backend("cuda", ("cuda",), _extension_probe("cuda"), _extension_functions),
    "cpp": Backend("cpp", ("cpu",), _extension_probe("cpu"), _extension_functions),
    "torch": Backend("torch", ("*",), lambda device_type: (True, "plain PyTorch reference", None), _torch_functions),
}
BACKENDS = tuple(TABLE)
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


def availability(name: str, device_type: str) -> tuple[bool, str, BaseException | None]:
    """Whether back end ``name`` can run on ``device_type``: ``(ok, reason, exception)``."""
    if name not in TABLE:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return TABLE[name].probe(device_type)


def resolve(requested: str, device_type: str) -> str:
    """The back end that runs for ``requested`` ("auto" or a name) on ``device_type``."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested != "auto" and requested not in TABLE:
            raise ValueError(f"{ENV_VAR}={requested!r} is not a backend; choose one of {('auto',) + BACKENDS}")
    if requested != "auto":
        ok, reason, exc = availability(requested, device_type)
        if not ok:
            raise BackendUnavailable(f"backend {requested!r} is unavailable on {device_type}: {reason}") from exc
        return requested
    skipped = []
    for name in AUTO_ORDER.get(device_type, ("torch",)):
        ok, reason, _ = availability(name, device_type)
        if ok:
            if skipped:
                log.info("badm_fast: using backend %r on %s; skipped %s", name, device_type, "; ".join(skipped))
            return name
        skipped.append(f"{name}: {reason}")
    raise BackendUnavailable(f"no backend available on {device_type}: " + "; ".join(skipped))  # unreachable: torch


def get(name: str) -> tuple[Callable[..., None], Callable[..., None], Callable[..., None]]:
    """``(step, nonfinite, copy_check)`` of back end ``name``."""
    if name not in TABLE:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    return TABLE[name].functions()
