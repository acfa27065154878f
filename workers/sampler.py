"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, top-N logprobs.

Rows are processed together (temperature, top-k and top-p as batched tensor ops); only the
final draw is per row, because a seeded request owns its own ``torch.Generator`` and must
draw the same numbers whatever batch it lands in. Logprobs are of the model's distribution
(log-softmax of the raw logits), as OpenAI reports them.
"""

from __future__ import annotations

import torch

from .request import Request


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._default = torch.Generator().manual_seed(seed)

    def _generator(self, req: Request) -> torch.Generator:
        if req.params.seed is None:
            return self._default
        if req.generator is None:
            req.generator = torch.Generator().manual_seed(req.params.seed)
        return req.generator

    @torch.inference_mode()
    def __call__(
        self, logits: torch.Tensor, reqs: list[Request]
    ) -> tuple[list[int], list[dict[int, float] | None]]:
        logits = logits.float()
        greedy = [r.params.greedy for r in reqs]
        tokens = logits.argmax(-1).tolist()
        if not all(greedy):
            probs = self.probabilities(logits, reqs)
            for i, r in enumerate(reqs):
                if not greedy[i]:
                    tokens[i] = int(torch.multinomial(probs[i], 1, generator=self._generator(r)))
        logprobs: list[dict[int, float] | None] = [None] * len(reqs)
        want = [r.params.logprobs for r in reqs]
        if any(n is not None for n in want):
            lp = torch.log_softmax(logits, dim=-1)
            top = max(n or 0 for n in want)
            top_v, top_i = lp.topk(top, dim=-1) if top else (None, None)
            for i, n in enumerate(want):
                if n is None:
                    continue
                d = {tokens[i]: float(lp[i, tokens[i]])}
                if n:
                    d.update(zip(top_i[i, :n].tolist(), top_v[i, :n].tolist()))
                logprobs[i] = d
        return tokens, logprobs

    @staticmethod
    def probabilities(logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        """The distribution each non-greedy row samples from after temperature/top-k/top-p."""
        temps = torch.tensor([r.params.temperature or 1.0 for r in reqs], dtype=logits.dtype)
        x = logits / temps[:, None]
        ks = [r.params.top_k for r in reqs]
        if any(k > 0 for k in ks):
            vocab = x.shape[-1]
            k = torch.tensor([k if k > 0 else vocab for k in ks])
            kth = x.sort(dim=-1, descending=True).values.gather(1, (k - 1).clamp(max=vocab - 1)[:, None])
            x = x.masked_fill(x < kth, float("-inf"))
        ps = torch.tensor([r.params.top_p for r in reqs], dtype=logits.dtype)
        if bool((ps < 1).any()):
            sorted_x, order = x.sort(dim=-1, descending=True)
            p = sorted_x.softmax(-1)
            # drop a token when the mass strictly before it already reaches top_p
            drop = (p.cumsum(-1) - p) >= ps[:, None]
            drop[:, 0] = False  # the most likely token always stays (top_p may round to 0)
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)
        probs = x.softmax(-1)
        # A row can only go non-finite through extreme parameters (overflowing temperature
        # scaling); fall back to that row's argmax rather than fail the whole batch.
        bad = ~torch.isfinite(probs).all(-1)
        if bool(bad.any()):
            probs[bad] = torch.nn.functional.one_hot(logits[bad].argmax(-1), probs.shape[-1]).to(probs.dtype)
        return probs
