"""Helpers shared by the benchmark scripts (never imported by the product)."""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict:
    import os

    import torch

    return {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def write_result(name: str, data: dict, folder: Path | None = None) -> Path:
    """Write ``data`` as ``<folder>/<name>.json`` (default: benchmarks/results/)."""
    folder = RESULTS if folder is None else Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path
