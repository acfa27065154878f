"""Paths and pins the deployment tests share (a plain module, not conftest: several test
folders have a conftest.py, so ``from conftest import`` would be ambiguous)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = REPO / "helm" / "pdserve"
RELEASE = "rel"
NAMESPACE = "serving"
# Kubernetes versions the rendered objects must be valid for: the chart's kubeVersion floor
# and the newest schemas kubernetes-validate ships.
K8S_VERSIONS = ("1.29.0", "1.37.0")


def pyproject_pins() -> dict[str, str]:
    """{'version': pdserve's version, 'ray': the pinned Ray version} from pyproject.toml."""
    import tomllib

    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    ray = next(d for d in data["project"]["dependencies"] if d.startswith("ray"))
    m = re.fullmatch(r"ray(\[[\w,]+\])?==([0-9.]+)", ray.replace(" ", ""))
    assert m, f"pyproject.toml pins Ray as {ray!r}; expected ray[...]==X.Y.Z"
    return {"version": data["project"]["version"], "ray": m.group(2)}


def venv_bin() -> Path:
    return Path(sys.executable).parent
