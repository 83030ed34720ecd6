"""The end-of-run summary: a table per arm, and the comparisons the study is about."""

from __future__ import annotations

import math

COLUMNS = [
    ("iteration", "it", "{:d}"),
    ("train_entropy_pixel", "entropy", "{:8.2f}"),
    ("train_duplicates", "dup", "{:d}"),
    ("train_spacing_pixel", "spacing", "{:.3f}"),
    ("gen_score_pixel", "gen score", "{:.3f}"),
    ("gen_score_ratio_pixel", "ratio", "{:.2f}"),
    ("mem_fraction_pixel", "mem", "{:.3f}"),
    ("copy_fraction_pixel", "copy", "{:.3f}"),
    ("variance_pixel", "variance", "{:.2f}"),
    ("fd_pixel", "fd", "{:.3f}"),
    ("verdict", "verdict", "{}"),
]


def _fmt(v, fmt):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def summarize(rows: list[dict], cfg, run_dir: str) -> dict:
    """Per-arm series of the main metrics and the study's comparisons (vanilla vs selection arms)."""
    arms: dict[str, list[dict]] = {}
    for r in rows:
        arms.setdefault(r["arm"], []).append(r)
    for v in arms.values():
        v.sort(key=lambda r: r["iteration"])
    extra = sorted({k for r in rows for k in r if k.startswith(("fd_", "train_entropy_", "gen_score_"))
                    and not k.endswith("_pixel")})
    keys = [c[0] for c in COLUMNS[1:]] + extra
    series = {a: {k: [r.get(k) for r in v] for k in ["iteration"] + keys} for a, v in arms.items()}
    checks = []
    vanilla = next((a.label() for a in cfg.arms if a.paradigm == "replace" and a.selector == "random"), None)
    complete = {a: len(v) == cfg.iterations for a, v in arms.items()}
    if vanilla and complete.get(vanilla):
        ent = series[vanilla]["train_entropy_pixel"]
        gs = series[vanilla]["gen_score_pixel"]
        falls = all(b < a for a, b in zip(ent, ent[1:]))
        checks.append({"check": f"{vanilla}: training-set entropy falls at every iteration", "ok": falls,
                       "values": ent})
        checks.append({"check": f"{vanilla}: generalization score lower at the last iteration than at iteration 0",
                       "ok": gs[-1] < gs[0], "values": [gs[0], gs[-1]]})
        for a in cfg.arms:
            lab = a.label()
            if lab == vanilla or not complete.get(lab) or a.selector == "random":
                continue
            for key, name in (("train_entropy_pixel", "training-set entropy"), ("gen_score_pixel", "generalization score")):
                mine, theirs = series[lab][key][-1], series[vanilla][key][-1]
                checks.append({"check": f"{lab}: {name} above {vanilla}'s at the last iteration",
                               "ok": mine > theirs, "values": [mine, theirs]})
    return {"run_dir": run_dir, "iterations": cfg.iterations, "arms": series, "checks": checks,
            "complete": all(complete.values()) and len(complete) == len(cfg.arms)}


def format_summary(summary: dict) -> str:
    lines = [f"run: {summary['run_dir']}"]
    for arm, s in summary["arms"].items():
        lines.append("")
        lines.append(f"arm {arm}")
        head = "  ".join(f"{c[1]:>9}" for c in COLUMNS)
        lines.append(head)
        for i in range(len(s["iteration"])):
            cells = []
            for key, _, fmt in COLUMNS:
                cells.append(f"{_fmt(s[key][i], fmt):>9}")
            lines.append("  ".join(cells))
    if summary["checks"]:
        lines.append("")
        lines.append("comparisons:")
        for c in summary["checks"]:
            vals = ", ".join(_fmt(v, "{:.3f}") for v in c["values"])
            lines.append(f"  [{'yes' if c['ok'] else 'NO '}] {c['check']}  ({vals})")
    return "\n".join(lines)
