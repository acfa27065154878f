"""Offline batch generation for scripts: ``pdserve.LLM(model).generate(prompts, params)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from .config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from .detokenizer import Detokenizer
from .engine import Engine
from .model_store import resolve_model
from .request import SamplingParams


@dataclass(frozen=True)
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[dict[int, float]]


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "float32",
        kv_cache_memory: int | None = None,
        num_blocks: int | None = None,
        num_threads: int | None = None,
        scheduler: SchedulerConfig | None = None,
        seed: int = 0,
    ) -> None:
        path = resolve_model(model)
        self.model_config = ModelConfig.from_path(path, dtype)
        self.tokenizer = load_tokenizer(path)
        self.engine = Engine(
            EngineConfig(
                self.model_config,
                CacheConfig(memory_bytes=kv_cache_memory, num_blocks=num_blocks),
                scheduler or SchedulerConfig(),
                num_threads=num_threads,
                seed=seed,
            )
        )

    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
                return_dict=False,
            ))
        return self.tokenizer(prompt)["input_ids"]

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
        chat: bool = False,
    ) -> list[Completion]:
        plist = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        ids = [self.encode(p, chat) for p in prompts]
        reqs = [self.engine.add_request(i, sp) for i, sp in zip(ids, plist)]
        detok = {r.request_id: Detokenizer(self.tokenizer, r.prompt_ids, r.params.stop) for r in reqs}
        texts = {r.request_id: "" for r in reqs}
        while self.engine.has_work:
            for o in self.engine.step():
                d = detok[o.request_id]
                texts[o.request_id] += d.add(o.new_token_ids, final=o.finished)
                if d.stopped and not o.finished:
                    self.engine.finish(o.request_id, "stop")
        out = []
        for r in reqs:
            out.append(Completion(r.prompt_ids, r.output_ids, texts[r.request_id], r.finish_reason,
                                  r.output_logprobs))
        return out

    def stream(self, prompt: str | Sequence[int], params: SamplingParams, chat: bool = False) -> Iterator[str]:
        """Yield text pieces of one request as they are generated (terminal chat)."""
        req = self.engine.add_request(self.encode(prompt, chat), params)
        d = Detokenizer(self.tokenizer, req.prompt_ids, params.stop)
        try:
            while not req.status.done:
                for o in self.engine.step():
                    if o.request_id == req.request_id:
                        piece = d.add(o.new_token_ids, final=o.finished)
                        if piece:
                            yield piece
                        if d.stopped and not o.finished:
                            self.engine.finish(req.request_id, "stop")
                            return
        finally:
            if not req.status.done:
                self.engine.abort(req.request_id)
