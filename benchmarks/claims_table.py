"""Markdown tables of a finished (or partial) run with seeds, for benchmarks/RESULTS.md and issue notes.

    .venv/bin/python benchmarks/claims_table.py RUN_DIR [--vs ARM]

Prints the claims table, then per arm the final iteration's mean and 95% t interval over seeds of the headline
quality metric, the Frechet distances, entropy, generalization score, real share, precision and coverage, and
(with --vs) each arm's paired difference against ARM at the last iteration.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from model_collapse.config import config_from_dict  # noqa: E402
from model_collapse.rundir import RunDir, read_json, read_metrics  # noqa: E402
from model_collapse.summary import summarize  # noqa: E402

METRICS = ["{q}", "fd_domain", "fd_pixel", "train_entropy_pixel", "gen_score_pixel", "train_real_fraction",
           "precision_domain", "coverage_domain", "precision_pixel", "coverage_pixel"]


def fmt(iv: dict) -> str:
    if not iv or not iv.get("n"):
        return "-"
    if iv.get("ci_low") is None:
        return f"{iv['mean']:.4g}"
    return f"{iv['mean']:.4g} [{iv['ci_low']:.3g}, {iv['ci_high']:.3g}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--vs", default=None, help="an arm to pair every other arm with")
    args = ap.parse_args()
    root = RunDir(Path(args.run_dir))
    cfg = config_from_dict(read_json(root.config_path))
    s = summarize(read_metrics(root.metrics_path), cfg, str(root.path))
    last = cfg.iterations - 1
    metrics = [m.format(q=cfg.quality_metric) for m in METRICS]
    print(f"seeds {s['seeds']}, iterations 0-{last}, quality = {cfg.quality_metric}\n")
    print("| claim | effect | 95% CI | seeds | sd over seeds | sampling sd | verdict |")
    print("|---|---|---|---|---|---|---|")
    for c in s["claims"]:
        if c["verdict"] == "skipped":
            print(f"| {c['id']} | | | | | | skipped: {c['reason']} |")
            continue
        ci = "" if c["ci_low"] is None else f"[{c['ci_low']:.3g}, {c['ci_high']:.3g}]"
        sd = "" if c.get("seed_sd") is None else f"{c['seed_sd']:.3g}"
        sp = "" if c.get("sampling_sd") is None else f"{c['sampling_sd']:.2g}"
        arms = f" ({' vs '.join(a for a in c['arms'] if a)})" if c.get("arms") else ""
        print(f"| {c['id']}{arms} | {c['effect']:.4g} | {ci} | {c['n_seeds']} | {sd} | {sp} | {c['verdict']} |")
    print(f"\nFinal iteration ({last}), mean [95% t interval] over seeds:\n")
    shown = [m for m in metrics if any(m in per for per in s["stats"].values())]
    print("| arm | " + " | ".join(shown) + " |")
    print("|---|" + "---|" * len(shown))
    for arm, per in s["stats"].items():
        print(f"| {arm} | " + " | ".join(fmt(per.get(m, [{}] * (last + 1))[last]) for m in shown) + " |")
    if args.vs:
        print(f"\nPaired difference (arm - {args.vs}) at the last iteration, mean [95% t interval]:\n")
        print("| arm | " + " | ".join(shown) + " |")
        print("|---|" + "---|" * len(shown))
        for key, per in s["paired"].items():
            a, _, b = key.partition(" - ")
            if args.vs not in (a, b):
                continue
            sign = 1 if b == args.vs else -1
            other = a if b == args.vs else b
            cells = []
            for m in shown:
                iv = per.get(m, {})
                if sign < 0 and iv.get("n"):
                    iv = {**iv, "mean": -iv["mean"], "ci_low": None if iv["ci_high"] is None else -iv["ci_high"],
                          "ci_high": None if iv["ci_low"] is None else -iv["ci_low"]}
                cells.append(fmt(iv))
            print(f"| {other} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
