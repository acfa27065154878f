"""Makes the benchmark modules importable by the tests here: ``import benchpath`` first.

The benchmark scripts import each other by top-level name (they run with benchmarks/ as their
import root). They are imported once here with that folder on sys.path, which is then taken
off again: benchmarks/ holds kernels.py and engine.py, which must not shadow same-named
packages (transformers probes for one called ``kernels``) for the rest of the test session.
(Not a conftest.py: other test folders ``from conftest import`` their own, and pytest keeps
only the last conftest it imported under that name.)"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

BENCH = str(Path(__file__).resolve().parents[2] / "benchmarks")

sys.path.insert(0, BENCH)
try:
    for _name in ("common", "workloads", "slo", "loadgen", "vllm_cpu", "servers", "goodput"):
        importlib.import_module(_name)
    try:
        importlib.import_module("goodput_plots")
    except ImportError:  # matplotlib not installed: the plot test skips
        pass
finally:
    sys.path.remove(BENCH)
