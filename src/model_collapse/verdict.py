"""Contraction or copying: a verdict per (arm, iteration), with the evidence that decided it.

A falling generalization score is read in the literature as memorization, but a training set that contracts
into tight clusters lowers it too, without any copying. The rules (thresholds in the config):

* copying: the nearest/second-nearest ratio test (mem_fraction) or the copy test normalised by the training
  set's own spacing (copy_fraction) exceeds `copy_level`;
* contracting: the training set's spacing has fallen below `contract_spacing_level` x the arm's iteration-0
  spacing and its entropy below the iteration-0 entropy, while the normalised score (gen_score_ratio) stays at or
  above `contract_ratio_level` x its iteration-0 value;
* stable: neither.
"""

from __future__ import annotations


def decide(row: dict, base: dict | None, copy_level: float, contract_ratio_level: float,
           contract_spacing_level: float = 0.9) -> tuple[str, dict]:
    """The verdict for one row, given the arm's iteration-0 row (None for iteration 0 itself)."""
    ev = {
        "mem_fraction": row.get("mem_fraction_pixel"),
        "copy_fraction": row.get("copy_fraction_pixel"),
        "copy_level": copy_level,
    }
    if max(ev["mem_fraction"] or 0.0, ev["copy_fraction"] or 0.0) > copy_level:
        return "copying", ev
    if base is None:
        return "stable", ev
    ev.update({
        "train_spacing": row.get("train_spacing_pixel"),
        "train_spacing_it0": base.get("train_spacing_pixel"),
        "train_entropy": row.get("train_entropy_pixel"),
        "train_entropy_it0": base.get("train_entropy_pixel"),
        "gen_score_ratio": row.get("gen_score_ratio_pixel"),
        "gen_score_ratio_it0": base.get("gen_score_ratio_pixel"),
        "contract_ratio_level": contract_ratio_level,
        "contract_spacing_level": contract_spacing_level,
    })
    if row.get("train_collapsed_pixel"):  # k or fewer distinct images left: contraction at its limit
        ev["train_collapsed"] = True
        return "contracting", ev
    try:
        shrinking = (ev["train_spacing"] < contract_spacing_level * ev["train_spacing_it0"]
                     and ev["train_entropy"] < ev["train_entropy_it0"])
        ratio_kept = ev["gen_score_ratio"] >= contract_ratio_level * ev["gen_score_ratio_it0"]
    except TypeError:  # a missing (non-finite) value
        return "stable", ev
    if shrinking and ratio_kept:
        return "contracting", ev
    return "stable", ev


def add_verdict(row: dict, history: list[dict], cfg) -> None:
    """Set row['verdict'] and row['verdict_evidence'] from the arm's iteration-0 row in history."""
    base = None
    if row["iteration"] > 0:
        base = next((r for r in history if r["arm"] == row["arm"] and r["iteration"] == 0), None)
    v, ev = decide(row, base, cfg.copy_level, cfg.contract_ratio_level, cfg.contract_spacing_level)
    row["verdict"] = v
    row["verdict_evidence"] = ev
