"""Kernel tests: each Triton kernel against its pure-torch reference.

Without a GPU the kernels run on CPU through the Triton interpreter. TRITON_INTERPRET must be
set before any ``@triton.jit`` decoration, hence here, at import; it only changes how Triton
runs kernels, and nothing else calls Triton on CPU unless ``PDSERVE_KERNELS=triton``, which
the ``triton`` fixture sets per test (monkeypatch), so other test folders are unaffected.
(``kernels.dispatch.runnable`` also re-wraps kernels decorated before this ran.) With a GPU
the same tests run the compiled kernels on CUDA tensors. The folder is a package so that this
conftest does not replace the ``conftest`` module other folders import helpers from.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

# Allowed kernel error beyond 2x the reference's own low-precision error, relative to the
# output's magnitude. The interpreter converts fp32 -> bf16 by truncation (up to 1 ulp =
# 2^-7 relative) where a GPU rounds to nearest (1/2 ulp), so bf16 gets one full ulp; fp16
# conversions round to nearest in both.
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 2**-7}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def default_device(device):
    """Tensors made without a device land on ``device`` (so the reject tests reach the
    Triton path's own checks on a GPU too)."""
    torch.set_default_device(device)
    yield device
    torch.set_default_device(None)


@pytest.fixture
def force_triton(monkeypatch):
    """Force the Triton path of every wrapper for this test only."""
    monkeypatch.setenv("PDSERVE_KERNELS", "triton")


@pytest.fixture
def assert_close():
    """``assert_close(out, ref_lowp, ref32)``: the flash-attention rule against an fp32
    reference: |out - ref32| <= 2 |ref_lowp - ref32| + atol (max norms)."""

    def check(out: torch.Tensor, ref_lowp: torch.Tensor, ref32: torch.Tensor) -> None:
        assert out.shape == ref32.shape and out.dtype == ref_lowp.dtype
        ref32 = ref32.float()
        err = (out.float() - ref32).abs().max().item() if out.numel() else 0.0
        ref_err = (ref_lowp.float() - ref32).abs().max().item() if out.numel() else 0.0
        mag = max(1.0, ref32.abs().max().item()) if out.numel() else 1.0
        bound = 2 * ref_err + ATOL[out.dtype] * mag
        assert err <= bound, f"kernel error {err:.3g} > {bound:.3g} (reference's {ref_err:.3g})"

    return check
