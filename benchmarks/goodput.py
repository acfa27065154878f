"""Goodput, DistServe's way: pdserve disaggregated vs pdserve colocated vs vLLM-CPU, on the same
cores with the same requests, in one run.

    python benchmarks/goodput.py --quick     # chatbot workload, short sweep (< 15 min, 2 cores)
    python benchmarks/goodput.py --full      # chatbot, code and summarization
    python benchmarks/goodput.py --smoke --model PATH --systems disagg,colocated   # harness check
    python benchmarks/goodput.py --plan plan.yaml   # planner validation: measure a planned config

Method. Each system runs alone — start, warm up, then per workload: measure its unloaded
latency (sequential median-prompt probes), sweep the request rates with Poisson arrivals, and
stop — so systems never share the cores. The workloads, their published source figures, the
length scaling and the SLO factors k1/k2 are documented in ``workloads.py``; SLOs, attainment
and goodput in ``slo.py``; the systems and core layouts in ``servers.py``; the client in
``loadgen.py``. After all systems ran, each workload's SLOs are fixed from the lowest unloaded
TTFT and TPOT any system achieved (or ``--ttft0/--tpot0``), attainment is computed per rate
and goodput (req/s with >= 90% attainment, interpolated) is divided by the CPUs used.

A system's sweep stops early once its attainment falls below 50%, or below 90% twice in a
row, judged against SLOs from its own unloaded latency; those SLOs are never tighter than the
final ones, so no rate that could reach 90% is skipped.

Writes benchmarks/results/goodput.json (per-request TTFT/TPOT included) and PNG plots
(attainment vs rate per workload; TTFT and TPOT CDFs at each system's goodput rate). The last
stdout line is one JSON object: ``goodput`` (req/s per CPU) per system and workload,
``disagg_vs_colocated`` and ``disagg_vs_vllm`` per workload.

Planner validation (``--plan FILE``, a config written by ``pdserve plan``): the system
``planned`` runs that config, judged by the plan's own (absolute) SLOs on the plan's workload,
at rates around the predicted goodput (0.5x to 3x unless ``--rates``); the summary's
``planner_validation`` holds the predicted and the measured goodput (req/s), their ratio and
whether they agree within 20%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from common import RESULTS, machine, progress, write_result
from loadgen import Target, run_schedule, run_sequential, served_model
from servers import (
    DEFAULT_SYSTEMS,
    REPO,
    SYSTEM_NAMES,
    PlannedSystem,
    System,
    SystemUnavailable,
    make_system,
    server_cores,
)
from slo import SLO, Latency, Outcome, attainment, goodput, percentile, reference
from workloads import (
    WORKLOADS,
    RequestSpec,
    Workload,
    arrival_times,
    make_requests,
    num_requests,
    probe_requests,
    smoke,
    token_range,
)

STOP_BELOW = 0.5  # stop a sweep once attainment falls below this ...
MISSES_IN_A_ROW = 2  # ... or below the target this many rates in a row
SETTLE_S = 2.0  # idle time between rates, so one rate's stragglers never load the next
PLAN_RATES = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)  # x the predicted goodput (a sweep stops
# early once attainment falls, see STOP_BELOW)
PLAN_TOLERANCE = 0.2  # the planner's prediction should be within 20% of the measurement


@dataclass(frozen=True)
class PlannedConfig:
    """A cluster config written by ``pdserve plan`` and what the planner predicted for it."""

    path: Path
    config: dict
    workload: str
    predicted_rps: float
    cpus: float
    slo: SLO
    describe: str

    @classmethod
    def load(cls, path: Path) -> PlannedConfig:
        import yaml

        text = path.read_text()
        meta = None
        describe = ""
        for line in text.splitlines():
            if line.startswith("# pdserve-plan: "):
                meta = json.loads(line[len("# pdserve-plan: "):])
            elif line.startswith("# plan: "):
                describe = line[len("# plan: "):]
        if meta is None:
            raise SystemExit(f"goodput: {path} has no '# pdserve-plan:' line; write it with "
                             "`pdserve plan ... --out FILE`")
        return cls(path, yaml.safe_load(text), meta["workload"],
                   float(meta["predicted_goodput_rps"]), float(meta["cpus"]),
                   SLO(float(meta["ttft_slo_s"]), float(meta["tpot_slo_s"])), describe)


@dataclass(frozen=True)
class Plan:
    """What one run measures; the same for every system."""

    workloads: tuple[Workload, ...]
    rates: dict[str, tuple[float, ...]]
    duration_s: float  # arrivals span about this long at each rate ...
    min_requests: int  # ... but never fewer requests than this
    max_requests: int  # ... nor more than this
    probes: int  # unloaded-latency probes per workload
    slo_scale: float
    seed: int

    def requests_at(self, rate: float) -> int:
        return num_requests(rate, self.duration_s, self.min_requests, self.max_requests)


def make_plan(args: argparse.Namespace) -> Plan:
    planned: PlannedConfig | None = args.planned
    names = args.workloads.split(",") if args.workloads else (
        [planned.workload] if planned else list(WORKLOADS) if args.full else ["chatbot"])
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"goodput: unknown workload(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(WORKLOADS)}")
    ws = [WORKLOADS[n] for n in names]
    if args.smoke:
        ws = [smoke(w) for w in ws]
    if args.k1 is not None or args.k2 is not None:
        ws = [replace(w, k1=args.k1 or w.k1, k2=args.k2 or w.k2) for w in ws]
    override = tuple(float(r) for r in args.rates.split(",")) if args.rates else None
    rates = {w.name: override or (w.rates if args.full else w.quick_rates) for w in ws}
    if planned is not None and override is None:
        rates = {w.name: tuple(round(planned.predicted_rps * f, 3) for f in PLAN_RATES)
                 for w in ws}
    if args.smoke:
        return Plan(tuple(ws), rates, duration_s=3.0, min_requests=4, max_requests=6, probes=2,
                    slo_scale=args.slo_scale, seed=args.seed)
    if args.full:
        return Plan(tuple(ws), rates, duration_s=60.0, min_requests=30, max_requests=240,
                    probes=5, slo_scale=args.slo_scale, seed=args.seed)
    if planned is not None:  # validation: enough requests per rate for a 90% threshold
        return Plan(tuple(ws), rates, duration_s=40.0, min_requests=20, max_requests=60,
                    probes=3, slo_scale=args.slo_scale, seed=args.seed)
    # --quick: about 3-4 minutes per system on 2 cores (start-up, probes, <= 5 rates).
    return Plan(tuple(ws), rates, duration_s=15.0, min_requests=8, max_requests=45, probes=3,
                slo_scale=args.slo_scale, seed=args.seed)


# ---- measuring one system --------------------------------------------------------------------
def _outcome_row(o: Outcome) -> list:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 5)

    return [r(o.ttft_s), r(o.tpot_s), o.num_tokens, o.error]


def _row_outcome(row: list) -> Outcome:
    return Outcome(row[0], row[1], row[2], row[3])


def _bar(total: int, desc: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, unit="req", leave=True,
                    dynamic_ncols=True)
    except ImportError:  # a plain line per rate instead
        progress(desc)
        return None


def warmup_specs(plan: Plan, vocab: int) -> list[RequestSpec]:
    """Short requests plus one of the longest prompt, so first-use costs (allocations, code
    paths for big shapes) are paid before anything is timed."""
    rng = random.Random(f"{plan.seed}:warmup")
    lo, hi = token_range(vocab)
    longest = max(w.input.hi for w in plan.workloads)
    lens = [16, 64, 64, 64, 64, longest]
    return [RequestSpec(-100 - i, tuple(rng.randint(lo, hi) for _ in range(n)), 8)
            for i, n in enumerate(lens)]


async def measure(system: System, target: Target, plan: Plan, vocab: int,
                  pinned: Latency | None) -> dict:
    """Warm up, then per workload: unloaded probes and the rate sweep. Raw outcomes only; SLOs
    and goodput are computed once every system ran."""
    warm = warmup_specs(plan, vocab)
    await run_sequential(target, warm[:2])
    await run_schedule(target, warm[2:], [0.0] * len(warm[2:]), lambda s: 120.0)
    out: dict = {}
    for w in plan.workloads:
        await asyncio.sleep(SETTLE_S)
        probes = await run_sequential(target, probe_requests(w, plan.probes, vocab, plan.seed))
        bad = [o.error for o in probes if o.error or o.ttft_s is None]
        if bad:
            raise RuntimeError(f"unloaded probes failed on {system.name}: {bad[0]}")
        unloaded = Latency(statistics.median(o.ttft_s for o in probes),
                           statistics.median(o.tpot_s or 0.0 for o in probes))
        own = SLO.relative(pinned or unloaded, w.k1, w.k2, plan.slo_scale)
        progress(f"{system.name} / {w.name}: unloaded TTFT {unloaded.ttft_s * 1e3:.0f} ms, TPOT "
                 f"{unloaded.tpot_s * 1e3:.1f} ms → own SLOs TTFT {own.ttft_s * 1e3:.0f} ms, "
                 f"TPOT {own.tpot_s * 1e3:.0f} ms")
        runs, misses = [], 0

        def deadline(s: RequestSpec, slo: SLO = own) -> float:
            return slo.deadline(s.max_tokens)

        for rate in plan.rates[w.name]:
            n = plan.requests_at(rate)
            specs = make_requests(w, n, vocab, plan.seed)
            arrivals = arrival_times(w, n, rate, plan.seed)
            bar = _bar(n, f"{system.name} {w.name} {rate:g} req/s")
            met = [0]

            def done(o: Outcome, bar=bar, met=met, slo: SLO = own) -> None:
                met[0] += o.meets(slo)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(f"met {met[0]}")

            t0 = time.monotonic()
            outs = await run_schedule(target, specs, arrivals, deadline, done)
            if bar is not None:
                bar.close()
            att = attainment(outs, own)
            runs.append({"rate": rate, "n": n, "wall_s": round(time.monotonic() - t0, 2),
                         "own_attainment": att, "requests": [_outcome_row(o) for o in outs]})
            progress(f"{system.name} / {w.name} @ {rate:g} req/s: {att:.0%} met own SLOs "
                     f"({sum(o.error is not None for o in outs)} errors/timeouts)")
            misses = misses + 1 if att < 0.9 else 0
            if att < STOP_BELOW or misses >= MISSES_IN_A_ROW:
                break
            await asyncio.sleep(SETTLE_S)
        out[w.name] = {"unloaded": {"ttft_s": unloaded.ttft_s, "tpot_s": unloaded.tpot_s,
                                    "probes": [_outcome_row(o) for o in probes]},
                       "runs": runs}
    return out


# ---- turning raw outcomes into SLO attainment and goodput ------------------------------------
def summarize(result: dict, plan: Plan, pinned: Latency | None,
              planned: PlannedConfig | None = None) -> dict:
    """Fill ``result["workloads"]`` and return the headline summary."""
    ok = {n: s for n, s in result["systems"].items() if s["status"] == "ok"}
    headline: dict = {"goodput": {}, "disagg_vs_colocated": {}, "disagg_vs_vllm": {},
                      "unit": "req/s per CPU"}
    for w in plan.workloads:
        measured = {n: s["measured"][w.name] for n, s in ok.items() if w.name in s["measured"]}
        if not measured:
            continue
        unloaded = {n: Latency(m["unloaded"]["ttft_s"], m["unloaded"]["tpot_s"])
                    for n, m in measured.items()}
        ref, source = (pinned, {"ttft": "--ttft0", "tpot": "--tpot0"}) if pinned else \
            reference(unloaded)
        slo = SLO.relative(ref, w.k1, w.k2, plan.slo_scale)
        entry: dict = {"spec": w.describe(), "rates": list(plan.rates[w.name]),
                       "reference": {"ttft_s": ref.ttft_s, "tpot_s": ref.tpot_s, "from": source},
                       "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "k1": w.k1,
                               "k2": w.k2, "scale": plan.slo_scale},
                       "systems": {}}
        for name, m in measured.items():
            points = []
            for run in m["runs"]:
                outs = [_row_outcome(r) for r in run["requests"]]
                ttfts = [o.ttft_s for o in outs if o.ttft_s is not None]
                tpots = [o.tpot_s for o in outs if o.tpot_s is not None]
                points.append({
                    "rate": run["rate"], "n": run["n"], "attainment": attainment(outs, slo),
                    "ttft_ok": sum(o.error is None and o.ttft_s is not None
                                   and o.ttft_s <= slo.ttft_s for o in outs) / len(outs),
                    "tpot_ok": sum(o.error is None and (o.tpot_s or 0) <= slo.tpot_s
                                   for o in outs) / len(outs),
                    "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p90_s": percentile(ttfts, 0.9),
                    "tpot_p50_s": percentile(tpots, 0.5), "tpot_p90_s": percentile(tpots, 0.9),
                    "errors": sum(o.error is not None and o.error != "timeout" for o in outs),
                    "timeouts": sum(o.error == "timeout" for o in outs)})
            gp = goodput([(p["rate"], p["attainment"]) for p in points])
            cpus = ok[name]["cpus"]
            entry["systems"][name] = {"points": points, "cpus": cpus, "goodput_rps": gp.rate,
                                      "goodput_per_cpu": gp.rate / cpus, "bound": gp.bound,
                                      "unloaded": m["unloaded"]}
            headline["goodput"].setdefault(name, {})[w.name] = round(gp.rate / cpus, 4)
            if gp.bound:
                headline.setdefault("bounds", {}).setdefault(name, {})[w.name] = gp.bound
        result["workloads"][w.name] = entry
        g = {n: s["goodput_per_cpu"] for n, s in entry["systems"].items()}
        for key, other in (("disagg_vs_colocated", "colocated"), ("disagg_vs_vllm", "vllm")):
            a, b = g.get("disagg"), g.get(other)
            headline[key][w.name] = round(a / b, 3) if a is not None and b else None
    headline["skipped"] = {n: s["reason"] for n, s in result["systems"].items()
                           if s["status"] != "ok"}
    if planned is not None:
        headline["planner_validation"] = validate_plan(result, planned)
    return headline


def validate_plan(result: dict, planned: PlannedConfig) -> dict:
    """The planned system's goodput under the plan's own SLOs vs the planner's prediction."""
    out: dict = {"plan": str(planned.path), "describe": planned.describe,
                 "workload": planned.workload,
                 "slo": {"ttft_s": planned.slo.ttft_s, "tpot_s": planned.slo.tpot_s},
                 "predicted_goodput_rps": planned.predicted_rps, "measured_goodput_rps": None}
    sys_ = result["systems"].get("planned", {})
    m = sys_.get("measured", {}).get(planned.workload) if sys_.get("status") == "ok" else None
    if m is None:
        out["error"] = sys_.get("reason", "the planned system was not measured")
        return out
    points = []
    for run in m["runs"]:
        outs = [_row_outcome(r) for r in run["requests"]]
        points.append({"rate": run["rate"], "attainment": attainment(outs, planned.slo)})
    gp = goodput([(p["rate"], p["attainment"]) for p in points])
    ratio = gp.rate / planned.predicted_rps if planned.predicted_rps else None
    out.update(measured_goodput_rps=round(gp.rate, 4), bound=gp.bound, points=points,
               measured_over_predicted=None if ratio is None else round(ratio, 3),
               within_20pct=ratio is not None and abs(ratio - 1) <= PLAN_TOLERANCE,
               cpus=planned.cpus)
    return out


# ---- the run ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="chatbot workload, short sweep "
                      "(the default)")
    size.add_argument("--full", action="store_true", help="all workloads, longer sweeps")
    size.add_argument("--smoke", action="store_true", help="a handful of tiny requests at 2 "
                      "rates: checks the harness end to end (use with a tiny --model)")
    ap.add_argument("--systems", default=None, help="comma-separated, from "
                    f"{', '.join(SYSTEM_NAMES)} (default: {','.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--workloads", default=None, help=f"comma-separated, from "
                    f"{', '.join(WORKLOADS)} (default: chatbot; --full: all)")
    ap.add_argument("--model", default=None, help="local HF model folder (default: "
                    "SmolLM2-135M-Instruct, fetched by pdserve)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cpus", type=int, default=2, help="cores every system gets (default 2)")
    ap.add_argument("--rates", default=None, help="comma-separated req/s, overriding the "
                    "workloads' sweeps")
    ap.add_argument("--slo-scale", type=float, default=1.0, help="multiply every SLO (< 1: "
                    "tighter), like DistServe's SLO scale")
    ap.add_argument("--k1", type=float, default=None, help="override every workload's k1")
    ap.add_argument("--k2", type=float, default=None, help="override every workload's k2")
    ap.add_argument("--ttft0", type=float, default=None, help="pin the reference unloaded "
                    "TTFT (s) instead of measuring it (needs --tpot0)")
    ap.add_argument("--tpot0", type=float, default=None, help="pin the reference unloaded "
                    "TPOT (s) (needs --ttft0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench-dir", type=Path, default=REPO / ".bench",
                    help="where baselines' environments, caches and server logs go")
    ap.add_argument("--no-vllm-setup", action="store_true", help="skip vLLM when its "
                    "environment is not set up yet, instead of installing it (3.4 GB)")
    ap.add_argument("--vllm-eager", action="store_true", help="start vLLM with "
                    "--enforce-eager (27 s instead of ~90 s start-up, ~10%% slower)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default "
                    "benchmarks/results; --smoke: <bench-dir>/smoke)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--plan", type=Path, default=None, help="validate the planner: measure "
                    "this config written by `pdserve plan` (system 'planned') against its "
                    "predicted goodput, under the plan's SLOs")
    args = ap.parse_args(argv)
    args.planned = PlannedConfig.load(args.plan) if args.plan else None
    if (args.ttft0 is None) != (args.tpot0 is None):
        ap.error("--ttft0 and --tpot0 go together")
    systems = args.systems.split(",") if args.systems else (
        ["planned"] if args.planned else list(DEFAULT_SYSTEMS))
    bad = [s for s in systems if s not in SYSTEM_NAMES and not (s == "planned" and args.plan)]
    if bad:
        ap.error(f"unknown system(s) {', '.join(bad)}; choose from {', '.join(SYSTEM_NAMES)}")
    args.system_list = systems
    return args


def model_folder(model: str | None) -> Path:
    if model:
        p = Path(model).expanduser()
        if not (p / "config.json").exists():
            raise SystemExit(f"goodput: {p} is not a Hugging Face model folder (no config.json)")
        return p
    from pdserve.workers.model_store import ensure_default_model

    return ensure_default_model(progress)


def model_max_len(plan: Plan, model_cfg: dict) -> int:
    """--max-model-len for baselines: the workloads' longest request rounded up to 512, at
    least 2048 (the recipe's), at most the model's context."""
    need = max(w.max_len for w in plan.workloads)
    want = max(2048, -(-need // 512) * 512)
    return min(want, int(model_cfg.get("max_position_embeddings", want)))


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    pinned = Latency(args.ttft0, args.tpot0) if args.ttft0 is not None else None
    planned: PlannedConfig | None = args.planned
    bench_name = "goodput" if planned is None else "goodput_plan"  # its own JSON, no plots
    if planned is not None:  # every system is judged by the plan's SLOs
        w = plan.workloads[0]
        pinned = Latency(planned.slo.ttft_s / (w.k1 * plan.slo_scale),
                         planned.slo.tpot_s / (w.k2 * plan.slo_scale))
    folder = model_folder(args.model)
    model_cfg = json.loads((folder / "config.json").read_text())
    vocab = int(model_cfg["vocab_size"])
    out_dir = args.out or (args.bench_dir / "smoke" if args.smoke else RESULTS)
    log_dir = args.bench_dir / "logs"
    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    cores = server_cores(args.cpus)
    if cores:  # the load generator keeps off the servers' cores
        os.sched_setaffinity(0, os.sched_getaffinity(0) - cores)
    result: dict = {
        "benchmark": "goodput", "mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "git": git_rev(),
        "machine": machine(), "model": str(folder), "dtype": args.dtype, "cpus": args.cpus,
        "plan": {"duration_s": plan.duration_s, "min_requests": plan.min_requests,
                 "max_requests": plan.max_requests, "probes": plan.probes, "seed": plan.seed,
                 "slo_scale": plan.slo_scale},
        "systems": {}, "workloads": {}}
    t_start = time.monotonic()
    progress(f"goodput ({mode}): systems {', '.join(args.system_list)}; workloads "
             f"{', '.join(w.name for w in plan.workloads)}; model {folder.name}")
    for name in args.system_list:
        entry: dict = {"status": "ok", "cpus": args.cpus}
        result["systems"][name] = entry
        t_sys = time.monotonic()
        try:
            if name == "planned":
                entry["cpus"] = planned.cpus
                system = PlannedSystem(name, max(1, round(planned.cpus)), log_dir,
                                       model=str(folder) if args.model else None,
                                       dtype=args.dtype, plan_config=planned.config,
                                       plan_label=planned.describe or str(planned.path))
            else:
                system = make_system(name, cpus=args.cpus, log_dir=log_dir,
                                     model=str(folder) if args.model else None,
                                     model_dir=str(folder), dtype=args.dtype,
                                     max_model_len=model_max_len(plan, model_cfg),
                                     bench_dir=args.bench_dir,
                                     vllm_setup=not args.no_vllm_setup,
                                     vllm_eager=args.vllm_eager)
            entry["label"] = system.label
            system.prepare()
        except Exception as e:  # noqa: BLE001 - SystemUnavailable, or a failed install
            entry.update(status="skipped", reason=str(e))
            progress(f"{name}: skipped — {e}")
            continue
        try:
            progress(f"{name}: starting {system.label}")
            t_up = time.monotonic()
            base = system.start()
            entry["log"] = str(system.log_path)
            entry["start_s"] = round(time.monotonic() - t_up, 1)
            progress(f"{name}: serving at {base} after {entry['start_s']} s")
            target = Target(base, asyncio.run(served_model(base)))
            entry["measured"] = asyncio.run(measure(system, target, plan, vocab, pinned))
        except SystemUnavailable as e:
            entry.update(status="skipped", reason=str(e))
            progress(f"{name}: skipped — {e}")
        except Exception as e:  # noqa: BLE001 - record it and go on with the other systems
            entry.update(status="failed", reason=f"{type(e).__name__}: {e}")
            progress(f"{name}: failed — {type(e).__name__}: {e}\n{system.log_tail()}")
        finally:
            system.stop()
            entry["wall_s"] = round(time.monotonic() - t_sys, 1)
            progress(f"{name}: stopped ({entry['wall_s']} s in all)")
        write_result(bench_name, result, out_dir)  # partial results survive a later crash
    if planned is not None:
        result["plan_file"] = {"path": str(planned.path), "config": planned.config}
    headline = summarize(result, plan, pinned, planned)
    result["summary"] = headline
    result["wall_s"] = round(time.monotonic() - t_start, 1)
    path = write_result(bench_name, result, out_dir)
    progress(f"results: {path}")
    if not args.no_plots and result["workloads"] and planned is None:
        try:
            from goodput_plots import plot_all

            for p in plot_all(result, out_dir):
                progress(f"plot: {p}")
        except ImportError as e:
            progress(f"plots skipped: {e} (pip install matplotlib)")
    progress(f"done in {result['wall_s'] / 60:.1f} min")
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
