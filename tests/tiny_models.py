"""Tiny random-weight Llama-family models written as real Hugging Face folders.

A byte-level BPE tokenizer is trained on the fly on a small multilingual corpus (so multi-byte
characters span tokens, as with real tokenizers); weights are drawn with a larger init scale
than HF's default so greedy argmax margins are well above fp32 rounding noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Serving large language models needs prefill and decode. ",
    "Un café crème, s'il vous plaît. Ça coûte deux euros. ",
    "日本語のテキストとキャッシュ。中文字符也在这里。 ",
    "Emoji 🚀🔥 and symbols ∑∫√ appear sometimes. ",
    "def add(a, b):\n    return a + b\n",
    "Numbers 0123456789 and punctuation!?.,;: ",
]


def make_tokenizer(folder: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def make_model(
    folder: Path,
    arch: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    num_layers: int = 2,
    tie: bool = True,
    seed: int = 0,
    init_std: float = 0.25,
    max_positions: int = 8192,
    rope_scaling: dict | None = None,
) -> Path:
    """Write a random ``arch`` in {llama, mistral, qwen2} model to ``folder``; return it."""
    import transformers as tf

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(folder)
    cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
    }[arch]
    kw = dict(
        vocab_size=len(tok), hidden_size=num_heads * head_dim, intermediate_size=96,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim, max_position_embeddings=max_positions,
        tie_word_embeddings=tie, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), rms_norm_eps=1e-5,
        initializer_range=init_std,
    )
    if arch == "mistral":
        kw["sliding_window"] = None
    if rope_scaling is not None:
        kw["rope_scaling"] = rope_scaling
    cfg = cls[0](**kw)
    torch.manual_seed(seed)
    model = cls[1](cfg).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, init_std)
    model.save_pretrained(folder, safe_serialization=True)
    cfg_path = folder / "config.json"
    c = json.loads(cfg_path.read_text())
    c["architectures"] = [cls[1].__name__]
    cfg_path.write_text(json.dumps(c, indent=1))
    return folder
