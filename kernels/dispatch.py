"""Choose between a Triton kernel and its pure-torch reference.

Rule: Triton when the tensors live on CUDA, or when ``PDSERVE_KERNELS=triton`` forces it
(with ``TRITON_INTERPRET=1`` that runs the kernels on CPU through the interpreter, which is
how the test suite proves them equal to the references). ``PDSERVE_KERNELS=torch`` forces the
references everywhere. This module imports nothing of pdserve.
"""

from __future__ import annotations

import functools
import os

import torch

ENV_KERNELS = "PDSERVE_KERNELS"  # "auto" (default) | "triton" | "torch"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - triton is a pinned dependency
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get(ENV_KERNELS, "auto").lower()
    if mode not in ("auto", "triton", "torch"):
        raise ValueError(f"{ENV_KERNELS}={mode!r}: expected one of auto, triton, torch")
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_KERNELS}=triton but triton cannot be imported")
        if t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{ENV_KERNELS}=triton on a {t.device.type} tensor needs TRITON_INTERPRET=1"
            )
        return True
    return t.device.type == "cuda" and triton_available()


def check(cond: bool, msg: str) -> None:
    """Raise a ValueError a caller can act on (shape/dtype/stride mismatches)."""
    if not cond:
        raise ValueError(msg)
