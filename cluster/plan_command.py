"""The bodies of ``pdserve profile`` and ``pdserve plan`` (``cli.py`` holds only their flags).

    pdserve profile --model M --tp N [--dtype D] [--cpus C] [--quick] [--out FILE.json]
    pdserve plan --workload W --ttft-slo S --tpot-slo T --cpus N [--profile FILE ...]
                 [--out plan.yaml]

Profiles default to ``<cache>/profiles/<model>-tp<N>-<dtype>-<C>cpu.json``; ``plan`` without
``--profile`` uses every profile there for ``--model`` (the default model if not given).
Progress goes to stderr; ``plan`` prints its table of plans on stdout and writes the best one
as a cluster config for ``pdserve up --config``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from .config import AppConfig
from .goodput import SLO
from .latency_model import Profile, TransferModel
from .planner import MODES, Plan, Planner, candidate_shapes, fmt_rate, valid_shapes
from .workload import load_workload


def _say(msg: str) -> None:
    print(f"[plan] {msg}", file=sys.stderr, flush=True)


def model_name(model: str | None) -> str:
    from pdserve.workers.model_store import ALIASES, DEFAULT_MODEL

    if model is None or model.lower() in ALIASES:
        return DEFAULT_MODEL
    return Path(model).expanduser().resolve().name


def profiles_dir() -> Path:
    from pdserve.envs import cache_dir

    return cache_dir() / "profiles"


def default_profile_path(model: str | None, tp: int, dtype: str, cpus: float) -> Path:
    return profiles_dir() / f"{model_name(model)}-tp{tp}-{dtype}-{cpus:g}cpu.json"


def profile_main(args: argparse.Namespace) -> int:
    from .profiler import FULL, QUICK, run_profile

    if args.tp < 1 or args.cpus <= 0:
        raise ValueError("--tp must be >= 1 and --cpus > 0")
    prof = run_profile(args.model, args.tp, args.dtype, args.cpus, QUICK if args.quick else FULL,
                       transfer=not args.no_transfer, seed=args.seed,
                       kv_cache_memory=args.kv_cache_memory)
    out = Path(args.out) if args.out else default_profile_path(args.model, args.tp, args.dtype,
                                                                 args.cpus)
    prof.save(out)
    print(out)
    return 0


def _load_profiles(args: argparse.Namespace) -> list[Profile]:
    if args.profile:
        return [Profile.load(p) for p in args.profile]
    found = sorted(profiles_dir().glob(f"{model_name(args.model)}-tp*.json"))
    if not found:
        raise FileNotFoundError(
            f"no profile of {model_name(args.model)} in {profiles_dir()}: run `pdserve profile "
            f"--model {args.model or model_name(None)}` first, or pass --profile FILE")
    return [Profile.load(p) for p in found]


def write_plan_config(plan: Plan, profile: Profile, slo: SLO, path: Path,
                      header: list[str]) -> AppConfig:
    """Write ``plan`` as YAML and load it back the way ``pdserve up --config`` does."""
    d = plan.config(profile.model, profile.dtype, slo)
    text = "".join(f"# {line}\n" for line in header) + yaml.safe_dump(d, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    cfg = AppConfig.from_yaml(path)
    cfg.check_model(profile.num_heads, profile.num_kv_heads)
    return cfg


def plan_header(best: Plan, workload: str, slo: SLO) -> list[str]:
    """The comment lines above a written plan: for people, and one JSON line
    (``pdserve-plan: {...}``) that ``benchmarks/goodput.py --plan`` reads to validate it."""
    header = [f"written by `pdserve plan` for workload {workload!r}",
              (f"predicted goodput {best.rate:.3g} req/s ({best.per_device:.3g} per CPU) at "
               f"TTFT <= {slo.ttft_s:g} s, TPOT <= {slo.tpot_s:g} s, 90% attainment"),
              f"plan: {best.mode}: {best.describe()}",
              "pdserve-plan: " + json.dumps({
                  "workload": workload, "predicted_goodput_rps": round(best.rate, 4),
                  "cpus": best.devices, "ttft_slo_s": slo.ttft_s, "tpot_slo_s": slo.tpot_s})]
    if not best.measured:
        header.append("NOTE: uses an extrapolated TP shape; profile it with `pdserve profile "
                      "--tp N` and re-plan")
    return header


def plan_main(args: argparse.Namespace) -> int:
    profiles = _load_profiles(args)
    first = profiles[0]
    models = {(p.model, p.dtype) for p in profiles}
    if len(models) > 1:
        raise ValueError(f"the profiles are of different models/dtypes {sorted(models)}; "
                         "pass --profile FILE for the profiles of one model and dtype")
    slo = SLO(args.ttft_slo, args.tpot_slo)
    workload = load_workload(args.workload)
    transfer = first.transfer
    if args.transfer_bandwidth is not None or args.transfer_latency is not None:
        transfer = TransferModel(args.transfer_bandwidth or transfer.bandwidth_bytes_per_s,
                                 transfer.latency_s if args.transfer_latency is None
                                 else args.transfer_latency)
    from .config import valid_tp_degrees

    degrees = ([int(x) for x in args.tp.split(",") if x.strip()] if args.tp else
               [d for d in valid_tp_degrees(first.num_heads, first.num_kv_heads) if d <= 4])
    shapes = candidate_shapes([p.latency for p in profiles], degrees, args.cpus)
    shapes = valid_shapes(shapes, first.num_heads, first.num_kv_heads)
    if not shapes:
        raise ValueError(f"none of TP degrees {degrees} splits the model's {first.num_heads} "
                         f"heads / {first.num_kv_heads} KV heads; valid: "
                         f"{valid_tp_degrees(first.num_heads, first.num_kv_heads)}")
    modes = MODES if args.mode == "both" else (args.mode,)
    _say(f"{workload.name}: TTFT <= {slo.ttft_s:g} s, TPOT <= {slo.tpot_s:g} s, {args.cpus:g} "
         f"CPUs, shapes {', '.join(f'tp{s.tp}' + ('' if s.measured else '(est)') for s in shapes)}")
    planner = Planner(workload, slo, args.cpus, shapes, transfer, modes, args.requests,
                      args.seed, args.verify, args.rate, progress=_say)
    plans = planner.run()
    print(f"{'#':>2}  {'mode':<14} {'goodput':>9} {'per CPU':>8} {'estimate':>9} {'CPUs':>5}  pools")
    for i, p in enumerate(plans[: args.top]):
        print(f"{i + 1:>2}  {p.mode:<14} {fmt_rate(p.rate):>9} {fmt_rate(p.per_device):>8} "
              f"{fmt_rate(p.estimate):>9} {p.devices:>5g}  {p.describe()}")
    print("(goodput: req/s with >= 90% of requests meeting both SLOs, by simulation;"
          " estimate: from one-instance rates)")
    best = plans[0]
    if args.rate is not None and best.rate < args.rate:
        _say(f"no plan within {args.cpus:g} CPUs reaches {args.rate:g} req/s; the best is "
             f"{best.rate:.3g} req/s (raise --cpus or relax the SLOs)")
    header = plan_header(best, workload.name, slo)
    out = Path(args.out)
    write_plan_config(best, first, slo, out, header)
    print(f"wrote {out} (pdserve up --config {out})")
    return 0
