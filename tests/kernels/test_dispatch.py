"""Which implementation the wrappers pick, and launching kernels decorated before
TRITON_INTERPRET was set."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from pdserve.kernels import dispatch


def test_use_triton_modes(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv(dispatch.ENV_KERNELS, raising=False)
    assert dispatch.use_triton(t) is False  # auto: CPU tensors take the reference
    monkeypatch.setenv(dispatch.ENV_KERNELS, "torch")
    assert dispatch.use_triton(t) is False
    monkeypatch.setenv(dispatch.ENV_KERNELS, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.use_triton(t)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.use_triton(t) is True
    monkeypatch.setenv(dispatch.ENV_KERNELS, "fast")
    with pytest.raises(ValueError, match="expected one of"):
        dispatch.use_triton(t)


def _add_one(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only behaviour")
def test_runnable_rewraps_a_compiled_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = triton.jit(_add_one)  # as if pdserve.kernels was imported before the env var
    assert isinstance(compiled, triton.runtime.jit.JITFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.arange(5.0)
    dispatch.runnable(compiled)[(1,)](x, 5, BLOCK=8)
    assert torch.equal(x, torch.arange(1.0, 6.0))
