"""Choose between a Triton kernel and its pure-torch reference.

Rule: Triton when the tensors live on CUDA, or when ``PDSERVE_KERNELS=triton`` forces it
(with ``TRITON_INTERPRET=1`` that runs the kernels on CPU through the interpreter, which is
how the test suite proves them equal to the references). ``PDSERVE_KERNELS=torch`` forces the
references everywhere. This module imports nothing of pdserve. It also holds what the
launchers share: ``runnable`` (interpreter or compiled, decided at call time), the CUDA
device guard, and the check helpers whose ValueErrors the wrappers raise.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

ENV_KERNELS = "PDSERVE_KERNELS"  # "auto" (default) | "triton" | "torch"
FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels compute in
INTS = (torch.int32, torch.int64)  # index tensors (block tables, slots, lengths)


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:  # pragma: no cover - triton is a pinned dependency
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


# ---- launching ----------------------------------------------------------------------------
# ``@triton.jit`` decides at decoration (import) time whether a kernel is compiled or
# interpreted, reading TRITON_INTERPRET then. Whoever imports ``pdserve.kernels`` first (a test
# folder collected before tests/kernels, a benchmark) would freeze that choice, so launchers go
# through ``runnable``, which re-wraps the same Python function for the interpreter when
# TRITON_INTERPRET=1 holds at call time. On a GPU (no TRITON_INTERPRET) it returns the kernel.

_INTERPRETED: dict = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def runnable(kernel):
    """``kernel`` (a ``@triton.jit`` function) in the form the current mode can launch."""
    if not interpreting():
        return kernel
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    fn = kernel.fn
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


def device_guard(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device, not the tensor's)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def upcast_dots(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be widened to fp32 first: the interpreter multiplies
    bf16 as raw bits (garbage), so there the kernels widen bf16 tiles, which gives the same
    numbers as a bf16 tensor-core dot with fp32 accumulation. Compiled kernels keep bf16."""
    return interpreting() and dtype == torch.bfloat16


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def num_sms(t: torch.Tensor) -> int:
    """Streaming multiprocessors of ``t``'s GPU (launch heuristics); a nominal 8 elsewhere."""
    if t.device.type == "cuda":
        return torch.cuda.get_device_properties(t.device).multi_processor_count
    return 8


def check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    check(t.dtype in allowed, f"{name}: dtype {t.dtype} not supported; expected one of "
          + ", ".join(str(d) for d in allowed))


def check_same_device(name: str, *ts: torch.Tensor | None) -> None:
    devs = {t.device for t in ts if t is not None}
    check(len(devs) <= 1, f"{name}: tensors are on different devices {sorted(map(str, devs))}")
