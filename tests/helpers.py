"""Shared test helpers (a plain module: several folders have a conftest.py of their own,
so ``from conftest import ...`` would be ambiguous)."""

from __future__ import annotations

from pathlib import Path

# A mix of prompt lengths: 1 token up to several blocks, multi-byte text included.
PROMPTS = [
    "The",
    "The quick brown fox",
    "Un café crème, s'il vous plaît.",
    "日本語のテキスト",
    "def add(a, b):\n    return a + b\n" * 3,
    "Emoji 🚀🔥 and symbols ∑∫√ appear sometimes. " * 2,
    "Serving large language models needs prefill and decode. " * 4,
    "Numbers 0123456789 and punctuation!?.,;: " * 6,
]



def hf_greedy(path: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hugging Face transformers greedy generation, one prompt at a time (the truth)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    outs = []
    for ids in prompt_ids:
        x = torch.tensor([ids])
        y = model.generate(x, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        outs.append(y[0, len(ids):].tolist())
    return outs


def smollm2_path() -> Path | None:
    from pdserve.workers.model_store import DEFAULT_MODEL, is_model_folder, models_dir

    p = models_dir() / DEFAULT_MODEL
    return p if is_model_folder(p) else None


# ---- a session-scoped local Ray Serve (loopback only), shared by tests/cluster and tests/router
