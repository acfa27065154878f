"""deploy/Dockerfile and deploy/Dockerfile.cuda, checked without Docker: the files parse, the
rules of pdserve's images hold (see dockerfile_check.check_image), and the commands the images
run (CMD, the model fetch, the health check) work here, outside the image."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from deploy_paths import DEPLOY, REPO, pyproject_pins, venv_bin
from dockerfile_check import (
    DockerIgnore,
    check_image,
    copied_to,
    healthcheck_command,
    parse,
    parse_copy,
)
from pdserve.cluster.config import AppConfig

IMAGES = {"Dockerfile": "cpu", "Dockerfile.cuda": "cuda"}


def load(name: str):
    return parse((DEPLOY / name).read_text())


def ignore_for(name: str) -> DockerIgnore:
    return DockerIgnore((DEPLOY / f"{name}.dockerignore").read_text())


@pytest.mark.parametrize("name", IMAGES)
def test_image_rules(name: str):
    pins = pyproject_pins()
    problems = check_image(load(name), REPO, ignore_for(name), pins["ray"], IMAGES[name],
                           pins["version"])
    assert problems == []


@pytest.mark.parametrize("name", IMAGES)
def test_stages_and_model(name: str):
    df = load(name)
    assert [s.name for s in df.stages] == ["build", "runtime", "model", "final"]
    model = df.stage("model")
    assert any("pdserve fetch-model" in i.value for i in model.all("RUN"))
    final = df.stages[-1]
    copies = [i.value for i in final.all("COPY")]
    assert any("--from=model" in c and "/opt/pdserve/cache/models" in c for c in copies)
    # The image's PDSERVE_CACHE is where the model stage put the model.
    env = " ".join(i.value for i in df.stage("runtime").all("ENV"))
    assert "PDSERVE_CACHE=/opt/pdserve/cache" in env


def test_cuda_torch_matches_the_base_image():
    df = load("Dockerfile.cuda")
    cuda = df.global_args["CUDA_TAG"]
    assert re.fullmatch(r"cu\d{3}", cuda)
    assert df.global_args["TORCH_INDEX_URL"].endswith(f"/whl/{cuda}")
    assert all(s.base.endswith(f"-{cuda}") for s in df.stages if "/" in s.base)
    # A --build-arg changes both together.
    df = parse((DEPLOY / "Dockerfile.cuda").read_text(), {"CUDA_TAG": "cu130"})
    assert df.stage("runtime").base.endswith("-cu130")
    assert df.global_args["TORCH_INDEX_URL"].endswith("/whl/cu130")
    cpu = load("Dockerfile")
    assert cpu.global_args["TORCH_INDEX_URL"].endswith("/whl/cpu")


@pytest.mark.parametrize("name", IMAGES)
def test_cmd_runs_outside_the_image(name: str, monkeypatch):
    df = load(name)
    final = df.stages[-1]
    cmd = df.effective(final, "CMD").exec_form()
    exe = venv_bin() / cmd[0]
    assert exe.exists(), f"{cmd[0]} is not installed by pdserve (looked in {venv_bin()})"
    # The subcommand and its flags parse: `pdserve up --config X --help`.
    proc = subprocess.run([str(exe), *cmd[1:], "--help"], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "--config" in proc.stdout
    # The config the CMD names is in the image, copied from this repository, and loads;
    # it serves on every interface, so pdserve needs API keys (docker run -e ...).
    config = cmd[cmd.index("--config") + 1]
    (src,) = copied_to(df, final, config)
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    with pytest.raises(ValueError, match="API keys"):
        AppConfig.from_yaml(REPO / src)
    monkeypatch.setenv("PDSERVE_API_KEYS", "sk-test")
    cfg = AppConfig.from_yaml(REPO / src)
    assert cfg.router.host == "0.0.0.0"
    # The health check asks that server, on the port the image exposes.
    url = urlparse(re.search(r"http://[^'\"]+", " ".join(healthcheck_command(df))).group(0))
    assert url.port == cfg.router.port
    exposed = {int(p) for i in final.all("EXPOSE") for p in i.value.split()}
    assert cfg.router.port in exposed


@pytest.mark.parametrize("name", IMAGES)
def test_build_steps_commands_exist(name: str):
    """Every `pdserve <subcommand>` a RUN step calls (the model fetch) is a real one."""
    df = load(name)
    subs = {m for s in df.stages for i in s.all("RUN")
            for m in re.findall(r"\bpdserve ([a-z][\w-]*)", i.value)}
    assert "fetch-model" in subs
    for sub in sorted(subs):
        proc = subprocess.run([str(venv_bin() / "pdserve"), sub, "--help"],
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, (sub, proc.stderr)


@pytest.mark.parametrize("name", IMAGES)
def test_healthcheck_asks_a_real_route(name: str):
    cmd = healthcheck_command(load(name))
    assert cmd[:2] == ["python", "-c"]
    compile(cmd[2], "<healthcheck>", "exec")
    path = urlparse(re.search(r"http://[^'\"]+", cmd[2]).group(0)).path
    from pdserve.router.ingress import app

    assert path in {getattr(r, "path", None) for r in app.routes}


def test_the_wheel_in_the_images_has_every_module(tmp_path: Path):
    """The images install pdserve from a wheel built out of the build stage's COPYs (not from
    this checkout, as the dev venv does): every module of the copied source folders must be in
    it, or the image fails at import time where the tests here pass."""
    df = load("Dockerfile")
    build = df.stage("build")
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for ins in build.all("COPY"):
        cp = parse_copy(ins, build.args)
        for src in cp.sources:
            target = ctx / (Path(src).name if cp.dest.endswith("/") else cp.dest)
            if (REPO / src).is_dir():
                shutil.copytree(REPO / src, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            else:
                shutil.copy2(REPO / src, target)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "--wheel-dir", str(tmp_path / "out"), str(ctx)],
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "out").glob("pdserve-*.whl")
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    package_dir = tomllib.loads((ctx / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    folder_to_pkg = {folder: pkg.replace(".", "/") for pkg, folder in package_dir.items()}
    expected = set()
    for folder, pkg in folder_to_pkg.items():
        for f in (ctx / folder).rglob("*.py"):
            expected.add(f"{pkg}/{f.relative_to(ctx / folder).as_posix()}")
    missing = sorted(expected - in_wheel)
    assert not missing, ("modules the image would lack (list their packages in pyproject.toml "
                         f"[tool.setuptools] packages): {missing}")


def test_dockerignore_lets_in_only_what_is_copied():
    ign = ignore_for("Dockerfile")
    for kept in ("pyproject.toml", "workers/engine.py", "deploy/serve.yaml", "pdserve/envs.py"):
        assert not ign.excluded(kept), kept
    for dropped in (".venv/bin/python", "tests/conftest.py", "benchmarks/results/x.json",
                    "workers/__pycache__/engine.cpython-311.pyc", "deploy/fetch-helm.sh"):
        assert ign.excluded(dropped), dropped


# ---- the reader and the rules on small files of their own (pure logic) --------------------
GOOD = textwrap.dedent("""\
    # syntax=docker/dockerfile:1
    ARG RAY_VERSION=2.60.0
    FROM rayproject/ray:${RAY_VERSION}-py311-cpu AS build
    COPY pyproject.toml ./
    RUN echo one \\
        && echo two
    FROM build AS final
    COPY --from=build /x /y
    LABEL org.opencontainers.image.title="t" org.opencontainers.image.version="0.1.0" \\
          org.opencontainers.image.description="d"
    HEALTHCHECK --interval=5s CMD ["true"]
    USER 1000:100
    CMD ["pdserve", "up"]
    """)


def rules(text: str, device: str = "cpu") -> list[str]:
    return check_image(parse(text), REPO, DockerIgnore(""), "2.60.0", device, "0.1.0")


def test_reader_basics():
    df = parse(GOOD)
    assert [(s.name, s.base) for s in df.stages] == [
        ("build", "rayproject/ray:2.60.0-py311-cpu"), ("final", "build")]
    (run,) = df.stage("build").all("RUN")
    assert run.value == "echo one && echo two" and run.line == 5
    assert df.effective(df.stages[-1], "CMD").exec_form() == ["pdserve", "up"]
    assert rules(GOOD) == []
    with pytest.raises(ValueError, match="before the first FROM"):
        parse("RUN true\nFROM x\n")


@pytest.mark.parametrize("edit,problem", [
    (("USER 1000:100", "USER root"), "runs as root"),
    (("USER 1000:100", "USER ray"), "not numeric"),
    (("USER 1000:100\n", ""), "no USER"),
    (("HEALTHCHECK --interval=5s CMD [\"true\"]", "HEALTHCHECK NONE"), "HEALTHCHECK"),
    (("ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.9.0"), "pins ray 2.60.0"),
    (("-py311-cpu", "-py311-cu128"), "not a cpu image"),
    (("rayproject/ray:", "python:3.11-"), "not an official"),
    (("COPY pyproject.toml", "COPY no-such-file.txt"), "does not exist"),
    (("--from=build", "--from=later"), "not an earlier stage"),
    (('version="0.1.0"', 'version="9.9"'), "pyproject says"),
    (('CMD ["pdserve", "up"]', "CMD pdserve up"), "exec-form CMD"),
])
def test_each_rule_catches_its_mistake(edit, problem):
    old, new = edit
    assert old in GOOD
    found = rules(GOOD.replace(old, new))
    assert any(problem in p for p in found), found


def test_single_stage_and_ignored_sources_are_caught():
    single = "FROM rayproject/ray:2.60.0-py311-cpu\nUSER 1000\nHEALTHCHECK CMD [\"true\"]\n" \
             "CMD [\"x\"]\n"
    assert any("multi-stage" in p for p in rules(single))
    df = parse(GOOD)
    found = check_image(df, REPO, DockerIgnore("*\n"), "2.60.0", "cpu", "0.1.0")
    assert any("excluded by the .dockerignore" in p for p in found)
