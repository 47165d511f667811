"""Triton kernels of badm_fast (the ``triton`` back end), shipped as ``badm_fast.kernels``.

Importing this package never imports triton: :func:`triton_available` tries the import on
first use and remembers why it failed, and :func:`badm_step` raises an :class:`ImportError`
naming triton when it cannot run. The kernels are defined (and the Triton interpreter mode
``TRITON_INTERPRET=1`` is read) when :mod:`badm_fast.kernels.badm_triton` is first imported.
"""

from __future__ import annotations

import importlib

__all__ = [
    "badm_step",
    "badm_nonfinite_check",
    "badm_copy_check",
    "require_triton",
    "triton_available",
    "triton_unavailable_reason",
    "TRITON_AVAILABLE",
]

_UNAVAILABLE: list[str | None] = []  # cached reason (None when triton imports)


def triton_unavailable_reason() -> str | None:
    """Why the Triton back end cannot be used here, or ``None`` when triton imports."""
    if not _UNAVAILABLE:
        try:
            importlib.import_module("triton")
            importlib.import_module("triton.language")
        except Exception as exc:  # ImportError, or a broken installation failing on import
            _UNAVAILABLE.append(
                f"triton is not importable ({type(exc).__name__}: {exc}); "
                "install it with `pip install triton` (Linux, matching your torch)"
            )
        else:
            _UNAVAILABLE.append(None)
    return _UNAVAILABLE[0]


def triton_available() -> bool:
    """Whether triton imports (not whether a GPU is present)."""
    return triton_unavailable_reason() is None


def require_triton() -> None:
    """Raise :class:`ImportError` with the reason when the Triton back end cannot be used."""
    reason = triton_unavailable_reason()
    if reason is not None:
        raise ImportError(f"the Triton back end of badm_fast is unavailable: {reason}")


def badm_step(
    params,
    grads,
    duals,
    weights,
    hyper,
    residuals=None,
    *,
    found_inf=None,
    inv_scale=None,
    block_size=None,
    num_warps=None,
):
    """One fused BADM step over tensor lists by the Triton kernel (the contract of
    :func:`badm_fast.reference.fused_step_`, one launch whatever the number of tensors); see
    :func:`badm_fast.kernels.badm_triton.badm_step`.

    Raises:
        ImportError: triton cannot be imported (the message says why).
    """
    require_triton()
    from .badm_triton import badm_step as _badm_step

    return _badm_step(
        params,
        grads,
        duals,
        weights,
        hyper,
        residuals,
        found_inf=found_inf,
        inv_scale=inv_scale,
        block_size=block_size,
        num_warps=num_warps,
    )


def badm_nonfinite_check(tensors, found_inf, *, block_size=None):
    """Raise the flag ``found_inf`` (set it to 1) when one of ``tensors`` (None entries skipped)
    holds a NaN or an infinity; see :func:`badm_fast.kernels.badm_triton.badm_nonfinite_check`.

    Raises:
        ImportError: triton cannot be imported (the message says why).
    """
    require_triton()
    from .badm_triton import badm_nonfinite_check as _check

    return _check(tensors, found_inf, block_size=block_size)


def badm_copy_check(dst, src, found_inf=None, *, block_size=None):
    """``dst[i].copy_(src[i])`` for every non-None ``src[i]``, raising ``found_inf`` on a
    non-finite copied value; see :func:`badm_fast.kernels.badm_triton.badm_copy_check`.

    Raises:
        ImportError: triton cannot be imported (the message says why).
    """
    require_triton()
    from .badm_triton import badm_copy_check as _copy_check

    return _copy_check(dst, src, found_inf, block_size=block_size)


def __getattr__(name):
    if name == "TRITON_AVAILABLE":
        return triton_available()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
