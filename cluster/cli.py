"""The ``pdserve`` command line.

    pdserve fetch-model              fetch and convert the default model (setup does this)
    pdserve generate --prompt TEXT   one completion, streamed to stdout
    pdserve chat                     an interactive chat in the terminal (streaming)
    pdserve up [--config FILE]       start the cluster: Ray, Redis, the Serve app (Ctrl-C stops)
    pdserve profile --model M        measure step latencies, fit a latency model (JSON)
    pdserve plan --workload W ...    size the pools for the highest goodput (writes a config)
    pdserve client PROMPT [--url U]  call a running server over HTTP or gRPC (streams)
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


def cmd_up(args) -> int:
    from .config import AppConfig, merge
    from .launcher import LOOPBACK, RedisServer, start_ray, start_serve, wait_forever

    over: dict = {}
    if args.model:
        over["model"] = args.model
    if args.mode:
        over["mode"] = args.mode
    if args.dtype:
        over["dtype"] = args.dtype
    if args.port is not None:
        over.setdefault("router", {})["port"] = args.port
    if args.redis_url:
        over["redis_url"] = args.redis_url
    cfg = AppConfig.from_yaml(args.config, over) if args.config else AppConfig.from_dict(merge({}, over))
    if cfg.router.host != LOOPBACK and not args.address:
        print(f"pdserve: serving on {cfg.router.host} (not loopback)")
    from pdserve.workers.model_store import resolve_model

    resolve_model(cfg.model)  # fetch/convert before anything starts, with progress output
    redis = None
    if cfg.redis_url is None:
        # Joining a cluster, every node's replicas must reach it: bind to this node's address
        # on the cluster's network, with a password (a loopback Redis only serves this node).
        if args.address:
            import secrets

            from .launcher import address_towards

            redis = RedisServer(host=address_towards(args.address),
                                password=secrets.token_hex(16)).start()
        else:
            redis = RedisServer().start()
        cfg = AppConfig.from_dict({**cfg.to_dict(), "redis_url": redis.url})
    try:
        print("[pdserve] starting Ray ...", flush=True)
        start_ray(args.address)
        from ray import serve

        from .app import build_app

        start_serve(cfg.router.host, cfg.router.port)
        print(f"[pdserve] deploying ({cfg.mode}: " + ", ".join(
            f"{k} x{v.replicas} tp={v.tp}" for k, v in cfg.pools.items()) + ") ...", flush=True)
        serve.run(build_app(cfg), name="pdserve", route_prefix="/", blocking=False,
                  external_scaler_enabled=True)  # replica counts: cluster/scaling.py
        base = f"http://{cfg.router.host}:{cfg.router.port}"
        print(f"[pdserve] ready.\n  OpenAI API: {base}/v1  (chat: {base}/v1/chat/completions)\n"
              f"  health:     {base}/health\n  Redis:      {cfg.redis_url}\n"
              "  Ctrl-C stops everything.", flush=True)
        wait_forever()
    finally:
        print("\n[pdserve] shutting down ...", flush=True)
        try:
            from ray import serve

            serve.shutdown()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        import ray

        ray.shutdown()
        if redis is not None:
            redis.stop()
    return 0


def cmd_profile(args) -> int:
    from .plan_command import profile_main

    return profile_main(args)


def cmd_plan(args) -> int:
    from .plan_command import plan_main

    return plan_main(args)


def cmd_client(args) -> int:
    from pdserve.client import run_cli

    return run_cli(args)


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
    p = sub.add_parser("up", help="start the serving cluster (Ray Serve app)")
    p.add_argument("--config", default=None, help="YAML cluster config (see deploy/)")
    p.add_argument("--model", default=None, help="local HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    p.add_argument("--address", default=None, help="join an existing Ray cluster")
    p.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    p.set_defaults(fn=cmd_up)
    p = sub.add_parser("chat", help="interactive chat in the terminal")
    _engine_args(p)
    p.set_defaults(fn=cmd_chat)
    p = sub.add_parser("profile", help="measure step latencies and fit a latency model")
    p.add_argument("--model", default=None, help="local HF folder (default: SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (Ray actors if > 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs (torch threads) per TP rank")
    p.add_argument("--quick", action="store_true", help="a small grid, one repeat")
    p.add_argument("--no-transfer", action="store_true", help="skip the KV-transfer probe")
    p.add_argument("--kv-cache-memory", type=_size, default=None,
                   help="KV pool per rank the pools will run with (default: engine default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file (default: <cache>/profiles/...)")
    p.set_defaults(fn=cmd_profile)
    p = sub.add_parser("plan", help="pick TP and replicas per pool for the highest goodput")
    p.add_argument("--workload", required=True,
                   help="chatbot | code | summarization | a workload YAML/JSON file")
    p.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    p.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    p.add_argument("--cpus", type=float, required=True, help="device budget: CPUs in all")
    p.add_argument("--profile", action="append", default=None,
                   help="a `pdserve profile` JSON (repeat for several TP degrees)")
    p.add_argument("--model", default=None, help="find its profiles in the cache (no --profile)")
    p.add_argument("--tp", default=None, help="TP degrees to consider, e.g. 1,2; unprofiled "
                   "ones are extrapolated (default: the model's valid degrees up to 4)")
    p.add_argument("--mode", choices=["both", "disaggregated", "colocated"], default="both")
    p.add_argument("--rate", type=float, default=None, help="target req/s: fewest CPUs reaching it")
    p.add_argument("--requests", type=int, default=400, help="simulated requests per rate")
    p.add_argument("--verify", type=int, default=4, help="plans per mode simulated whole")
    p.add_argument("--top", type=int, default=5, help="plans to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--transfer-bandwidth", type=_size, default=None,
                   help="KV transfer bytes/s between instances (default: the profile's)")
    p.add_argument("--transfer-latency", type=float, default=None, help="seconds per transfer")
    p.add_argument("--out", default="plan.yaml", help="cluster config to write")
    p.set_defaults(fn=cmd_plan)
    p = sub.add_parser("client", help="call a running server over HTTP or gRPC")
    from pdserve.client import add_cli_arguments

    add_cli_arguments(p)
    p.set_defaults(fn=cmd_client)
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
