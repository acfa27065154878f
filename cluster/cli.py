"""The ``pdserve`` command line.

    pdserve fetch-model              fetch and convert the default model (setup does this)
    pdserve generate --prompt TEXT   one completion, streamed to stdout
    pdserve chat                     an interactive chat in the terminal (streaming)
"""

from __future__ import annotations

import argparse
import logging
import sys

from pdserve.envs import log_level


def _size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' → bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}
    t = text.strip().lower()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    try:
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 2GiB, 512MiB)") from None


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--kv-cache-memory", type=_size, default=None, help="KV pool size, e.g. 2GiB")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=None)


def _llm(args):
    from pdserve.workers.llm import LLM

    return LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
               num_threads=args.threads)


def _params(args):
    from pdserve.workers.request import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, seed=args.seed)


def cmd_fetch_model(args) -> int:
    from pdserve.workers.model_store import ensure_default_model

    print(ensure_default_model())
    return 0


def cmd_generate(args) -> int:
    llm = _llm(args)
    for piece in llm.stream(args.prompt, _params(args), chat=args.chat):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args) -> int:
    llm = _llm(args)
    history: list[dict] = []
    print("pdserve chat — type a message, Ctrl-D or /exit to quit, /reset to clear history")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history.clear()
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        ids = list(llm.tokenizer.apply_chat_template(
            history, add_generation_prompt=True, tokenize=True, return_dict=False))
        sys.stdout.write("assistant> ")
        reply = []
        try:
            for piece in llm.stream(ids, _params(args)):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pdserve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("fetch-model", help="fetch and convert the default model")
    p.set_defaults(fn=cmd_fetch_model)
    p = sub.add_parser("generate", help="generate one completion")
    _engine_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    _engine_args(p)
    p.set_defaults(fn=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
