"""Two runs of the same study under two settings, claim by claim: what a change of numerics does to the findings.

    .venv/bin/python benchmarks/claims_compare.py RUN_A RUN_B

Both runs must hold the same seeds and arms (for example the `claims` preset with and without `batch_models`).
For each claim: its effect and verdict in each run (mean over seeds), the paired difference B - A over seeds with
its 95% t interval, and the spread of A's per-seed effects (how far a different seed moves it), so a difference
can be read against what a seed does. Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from model_collapse.claims import check_claims  # noqa: E402
from model_collapse.config import config_from_dict  # noqa: E402
from model_collapse.rundir import RunDir, read_json, read_metrics  # noqa: E402
from model_collapse.stats import mean_ci  # noqa: E402


def per_seed_effects(run: Path) -> tuple[dict[str, dict[int, float]], dict[str, str]]:
    """{claim id: {seed: that seed's effect}} and {claim id: verdict over all seeds}."""
    root = RunDir(run)
    cfg = config_from_dict(read_json(root.config_path))
    rows = read_metrics(root.metrics_path)
    verdicts = {c["id"]: c["verdict"] for c in check_claims(rows, cfg)}
    effects: dict[str, dict[int, float]] = {}
    for seed in sorted({r["seed"] for r in rows}):
        for c in check_claims([r for r in rows if r["seed"] == seed], cfg):
            if c["effect"] is not None:
                effects.setdefault(c["id"], {})[seed] = c["effect"]
    return effects, verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_a")
    ap.add_argument("run_b")
    args = ap.parse_args()
    (ea, va), (eb, vb) = per_seed_effects(Path(args.run_a)), per_seed_effects(Path(args.run_b))
    print(f"A = {args.run_a}, B = {args.run_b}\n")
    print("| claim | A: effect, verdict | B: effect, verdict | B - A over seeds, 95% CI | sd of A's per-seed effect |")
    print("|---|---|---|---|---|")
    for cid in va:
        a, b = ea.get(cid, {}), eb.get(cid, {})
        seeds = sorted(set(a) & set(b))
        if not seeds:
            print(f"| {cid} | {va[cid]} | {vb.get(cid, '-')} | | |")
            continue
        ma, mb = mean_ci([a[s] for s in seeds]), mean_ci([b[s] for s in seeds])
        d = mean_ci([b[s] - a[s] for s in seeds])
        ci = "" if d.ci_low is None else f" [{d.ci_low:.3g}, {d.ci_high:.3g}]"
        sd = "" if ma.sd is None else f"{ma.sd:.3g}"
        print(f"| {cid} | {ma.mean:.4g}, {va[cid]} | {mb.mean:.4g}, {vb.get(cid, '-')} | {d.mean:.3g}{ci} | {sd} |")


if __name__ == "__main__":
    main()
