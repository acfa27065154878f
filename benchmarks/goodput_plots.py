"""PNG plots of a goodput run (matplotlib, Agg backend: no display needed).

Per workload:
- ``goodput_<workload>_attainment.png``: SLO attainment vs request rate, one line per system,
  the 90% target, and each system's goodput marked on its line.
- ``goodput_<workload>_cdf.png``: TTFT and TPOT CDFs, per system, at the measured rate
  nearest its goodput (the highest rate that still met the target; the lowest rate if none
  did), with the SLOs drawn in.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from slo import TARGET


def _cdf(ax, values: list[float], label: str) -> None:
    xs = sorted(values)
    if not xs:
        return
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step([xs[0], *xs], [0.0, *ys], where="post", label=label)


def goodput_run(points: list[dict], goodput: float) -> dict:
    """The measured rate to show CDFs for: the highest at or below ``goodput`` that met the
    target, else the lowest."""
    met = [p for p in points if p["rate"] <= goodput + 1e-9 and p["attainment"] >= TARGET]
    return max(met, key=lambda p: p["rate"]) if met else min(points, key=lambda p: p["rate"])


def plot_attainment(name: str, wl: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for sys_name, s in wl["systems"].items():
        rates = [p["rate"] for p in s["points"]]
        att = [100 * p["attainment"] for p in s["points"]]
        per_cpu = s["goodput_per_cpu"]
        if s["bound"] == "upper":  # below the lowest rate: say so rather than a made-up figure
            what = f"< {min(rates) / s['cpus']:.2f}"
        else:
            what = ("≥ " if s["bound"] == "lower" else "") + f"{per_cpu:.2f}"
        (line,) = ax.plot(rates, att, marker="o",
                          label=f"{sys_name} (goodput {what} req/s/CPU)")
        ax.axvline(s["goodput_rps"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(100 * TARGET, color="grey", linestyle="--", linewidth=1)
    slo = wl["slo"]
    ax.set(xlabel="request rate (req/s, whole system)", ylabel="SLO attainment (%)",
           ylim=(0, 105), title=f"{name}: TTFT ≤ {slo['ttft_s'] * 1e3:.3g} ms, "
                                f"TPOT ≤ {slo['tpot_s'] * 1e3:.3g} ms")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path = out / f"goodput_{name}_attainment.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cdfs(name: str, wl: dict, raw: dict[str, dict], out: Path) -> Path:
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for sys_name, s in wl["systems"].items():
        chosen = goodput_run(s["points"], s["goodput_rps"])
        run = next(r for r in raw[sys_name]["runs"] if r["rate"] == chosen["rate"])
        ttfts = [r[0] * 1e3 for r in run["requests"] if r[0] is not None]
        tpots = [r[1] * 1e3 for r in run["requests"] if r[1] is not None]
        label = f"{sys_name} @ {chosen['rate']:g} req/s"
        _cdf(a1, ttfts, label)
        _cdf(a2, tpots, label)
    for ax, key, what in ((a1, "ttft_s", "TTFT"), (a2, "tpot_s", "TPOT")):
        ax.axvline(wl["slo"][key] * 1e3, color="grey", linestyle="--", linewidth=1,
                   label=f"{what} SLO")
        ax.set(xlabel=f"{what} (ms)", ylabel="share of requests", ylim=(0, 1.02),
               title=f"{name}: {what} at the goodput rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = out / f"goodput_{name}_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(result: dict, out: Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, wl in result["workloads"].items():
        if not wl["systems"]:
            continue
        raw = {s: result["systems"][s]["measured"][name] for s in wl["systems"]}
        paths.append(plot_attainment(name, wl, out))
        paths.append(plot_cdfs(name, wl, raw, out))
    return paths
