"""pdserve: prefill/decode-disaggregated LLM serving on Ray Serve.

Offline use::

    import pdserve
    llm = pdserve.LLM()  # the default model, SmolLM2-135M-Instruct
    print(llm.generate(["Hello"], pdserve.SamplingParams(max_tokens=16, temperature=0))[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: ``import pdserve.kernels`` must not pull in torch-heavy engine modules.
    if name == "LLM":
        from pdserve.workers.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.workers.request import SamplingParams

        return SamplingParams
    raise AttributeError(name)
