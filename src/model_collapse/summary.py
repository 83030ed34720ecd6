"""The end-of-run summary: per arm and iteration the mean of every metric over seeds with its 95% t interval,
the paired difference of every pair of arms at the last iteration, and the reference study's claims checked
(`claims`)."""

from __future__ import annotations

import math
from itertools import combinations

from model_collapse.claims import check_claims
from model_collapse.config import study_seeds
from model_collapse.stats import mean_ci, paired_difference

COLUMNS = [
    ("iteration", "it", "{:d}"),
    ("train_entropy_pixel", "entropy", "{:8.2f}"),
    ("train_duplicates", "dup", "{:.0f}"),
    ("train_spacing_pixel", "spacing", "{:.3f}"),
    ("gen_score_pixel", "gen score", "{:.3f}"),
    ("gen_score_ratio_pixel", "ratio", "{:.2f}"),
    ("mem_fraction_pixel", "mem", "{:.3f}"),
    ("copy_fraction_pixel", "copy", "{:.3f}"),
    ("variance_pixel", "variance", "{:.2f}"),
    ("fd_pixel", "fd", "{:.3f}"),
    ("kid_pixel", "kid", "{:.4f}"),
    ("train_real_fraction", "real", "{:.2f}"),
    ("verdict", "verdict", "{}"),
]


def fmt_number(v, fmt):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def numeric_metrics(rows: list[dict]) -> list[str]:
    """Every metric key holding a number in some row (not the coordinates)."""
    keys = {k for r in rows for k, v in r.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return sorted(keys - {"seed", "iteration", "pool_factor"})


def by_arm_seed(rows: list[dict], cfg) -> dict[str, dict[int, dict[int, dict]]]:
    """arm -> seed -> iteration -> row (a row written before rows had seeds belongs to the config's seed)."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["arm"], {}).setdefault(r.get("seed", cfg.seed), {})[r["iteration"]] = r
    return out


def arm_statistics(rows: list[dict], cfg) -> dict:
    """arm -> metric -> one interval (mean, ci_low, ci_high, n, sd over seeds) per iteration."""
    grid, metrics = by_arm_seed(rows, cfg), numeric_metrics(rows)
    out = {}
    for arm, seeds in grid.items():
        out[arm] = {m: [mean_ci([seeds[s][t].get(m) for s in seeds if t in seeds[s]]).as_dict()
                        for t in range(cfg.iterations)] for m in metrics}
    return out


def paired_statistics(rows: list[dict], cfg) -> dict:
    """'A - B' -> metric -> the paired difference over seeds at the last iteration."""
    grid, metrics, last = by_arm_seed(rows, cfg), numeric_metrics(rows), cfg.iterations - 1
    out = {}
    labels = [a.label() for a in cfg.arms if a.label() in grid]
    for a, b in combinations(labels, 2):
        va = {s: r[last] for s, r in grid[a].items() if last in r}
        vb = {s: r[last] for s, r in grid[b].items() if last in r}
        out[f"{a} - {b}"] = {m: paired_difference({s: r.get(m) for s, r in va.items()},
                                                  {s: r.get(m) for s, r in vb.items()}).as_dict()
                             for m in metrics}
    return out


def summarize(rows: list[dict], cfg, run_dir: str) -> dict:
    """Per-arm series (means over seeds), their intervals, paired differences, and the claims."""
    stats = arm_statistics(rows, cfg)
    keys = [c[0] for c in COLUMNS[1:-1]] + sorted(
        {k for r in rows for k in r if k.startswith(("fd_", "kid_", "train_entropy_", "gen_score_"))
         and not k.endswith("_pixel") and not k.startswith("kid_std")})
    series = {}
    for arm, per in stats.items():
        s = {"iteration": list(range(cfg.iterations))}
        for k in keys:
            s[k] = [iv["mean"] if iv["n"] else None for iv in per.get(k, [{"n": 0}] * cfg.iterations)]
        series[arm] = s
    seeds = study_seeds(cfg)
    if len(seeds) == 1:  # one seed: the verdict of each row as well
        for arm, per in by_arm_seed(rows, cfg).items():
            one = per.get(seeds[0], {})
            series[arm]["verdict"] = [one.get(t, {}).get("verdict") for t in range(cfg.iterations)]
    grid = by_arm_seed(rows, cfg)
    complete = all(len(grid.get(a.label(), {}).get(s, {})) == cfg.iterations for a in cfg.arms for s in seeds)
    return {"run_dir": run_dir, "iterations": cfg.iterations, "seeds": list(seeds),
            "quality_metric": cfg.quality_metric, "arms": series, "stats": stats,
            "paired": paired_statistics(rows, cfg), "claims": check_claims(rows, cfg), "complete": complete}


VERDICT_MARK = {"holds": "HOLDS", "fails": "FAILS", "inconclusive": "incon", "skipped": "skip "}


def format_claims(claims: list[dict]) -> list[str]:
    lines = []
    for c in claims:
        if c["verdict"] == "skipped":
            lines.append(f"  [{VERDICT_MARK['skipped']}] {c['id']}: {c['reason']}")
            continue
        ci = (f"[{fmt_number(c['ci_low'], '{:.4g}')}, {fmt_number(c['ci_high'], '{:.4g}')}]" if c["ci_low"] is not None
              else "(no interval)")
        noise = f", sampling sd {c['sampling_sd']:.2g}" if c.get("sampling_sd") is not None else ""
        lines.append(f"  [{VERDICT_MARK[c['verdict']]}] {c['id']}: effect {fmt_number(c['effect'], '{:.4g}')} "
                     f"{ci}, {c['direction']} {c['threshold']:g}, {c['n_seeds']} seed(s); {c['metric']}{noise}")
    return lines


def format_summary(summary: dict) -> str:
    seeds = summary.get("seeds", [])
    lines = [f"run: {summary['run_dir']}"]
    if summary.get("claims"):  # first: what the run says about the study's claims
        lines.append(f"claims (95% t intervals over seeds; quality = {summary.get('quality_metric')}):")
        lines += format_claims(summary["claims"])
        lines.append("")
    if len(seeds) > 1:
        lines.append(f"seeds: {', '.join(map(str, seeds))} (tables: means over seeds; summary.json has every "
                     "interval)")
    for arm, s in summary["arms"].items():
        lines.append("")
        lines.append(f"arm {arm}")
        cols = [c for c in COLUMNS if c[0] in s]
        lines.append("  ".join(f"{c[1]:>9}" for c in cols))
        for i in range(len(s["iteration"])):
            lines.append("  ".join(f"{fmt_number(s[key][i], fmt):>9}" for key, _, fmt in cols))
    return "\n".join(lines)
