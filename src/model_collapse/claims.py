"""The reference study's claims, checked on a run: each one a per-seed effect, its mean and 95% t interval over
seeds (`stats`), and a verdict.

Every claim names the arms it needs by what they are (paradigm, selector, training-set factor, guidance), not by
name, so any config with such arms is checked; a claim whose arms the run lacks is `skipped` with the reason.
"Final" is the last iteration of the config. Verdicts: `holds` when the interval lies wholly on the claimed side
of the claim's threshold, `fails` when it lies wholly on the other side, `inconclusive` when it straddles the
threshold (or there is one seed, so no interval).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from model_collapse.config import ArmConfig, RunConfig, arm_guidance, own_iteration0
from model_collapse.stats import Interval, correlation_ci, mean_ci, number, paired_difference, pearson_r, verdict

CURATION = ("gated", "herding", "capped")  # the selectors that measure candidates against a reference (`curation`)


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str  # one sentence
    metric: str  # what the effect is computed from
    effect: str  # what the per-seed effect is, in words
    threshold: float
    direction: str  # the claim holds when the effect lies "above" or "below" the threshold
    arms: tuple[str, ...]  # roles of the arms it needs (see ROLES)
    compute: Callable  # (values: {role: {seed: {iteration: row}}}, last: int) -> Interval, or (Interval, roles)
    any_of: tuple[str, ...] = ()  # it also needs at least one arm of these roles


# ---------------------------------------------------------------------------------------------- arm roles


def _is(arm: ArmConfig, cfg: RunConfig, paradigm: str, selector: str, guided: bool | None = False,
        train_factor: float = 1.0) -> bool:
    w = arm_guidance(cfg, arm)
    # a vanilla arm trains on its whole pool (pool_factor 1, or the 2N ablation); a selection arm has a pool to
    # choose from. Vanilla accumulate may mix its sources uniformly or by equal shares (`accumulate_mix`).
    pool_ok = arm.pool_factor == train_factor if selector == "random" else arm.pool_factor > train_factor
    return (arm.paradigm == paradigm and arm.selector == selector and arm.train_factor == train_factor
            and (guided is None or (w > 0) == guided) and pool_ok)


ROLES: dict[str, Callable[[ArmConfig, RunConfig], bool]] = {
    "vanilla_replace": lambda a, c: _is(a, c, "replace", "random"),
    "greedy_replace": lambda a, c: _is(a, c, "replace", "greedy"),
    "threshold_replace": lambda a, c: _is(a, c, "replace", "threshold"),
    "vanilla_accumulate": lambda a, c: _is(a, c, "accumulate", "random"),
    "greedy_accumulate": lambda a, c: _is(a, c, "accumulate", "greedy"),
    "threshold_accumulate": lambda a, c: _is(a, c, "accumulate", "threshold"),
    "vanilla_replace_2n": lambda a, c: _is(a, c, "replace", "random", train_factor=2.0),
    "vanilla_replace_guided": lambda a, c: _is(a, c, "replace", "random", guided=True),
    "greedy_replace_guided": lambda a, c: _is(a, c, "replace", "greedy", guided=True),
    "threshold_replace_guided": lambda a, c: _is(a, c, "replace", "threshold", guided=True),
    **{f"{sel}_{par}": (lambda a, c, sel=sel, par=par: _is(a, c, par, sel))
       for sel in CURATION for par in ("replace", "accumulate")},
}


def role_arms(cfg: RunConfig) -> dict[str, str]:
    """role -> the label of the first arm of the config that plays it."""
    out = {}
    for role, test in ROLES.items():
        for a in cfg.arms:
            if test(a, cfg):
                out[role] = a.label()
                break
    return out


# ---------------------------------------------------------------------------------------------- effects


def _at(rows: dict, it: int, metric: str) -> float | None:
    return number(rows.get(it, {}).get(metric))


def _last(v: dict, role: str, metric: str, last: int) -> dict:
    """{seed: the role's metric at the last iteration}, None where it is missing."""
    return {s: _at(rows, last, metric) for s, rows in v[role].items()}


def _change(role: str, metric: str):
    """Per seed: metric at the last iteration minus at iteration 0."""
    def f(v, last):
        vals = []
        for rows in v[role].values():
            a, b = _at(rows, 0, metric), _at(rows, last, metric)
            if a is not None and b is not None:
                vals.append(b - a)
        return mean_ci(vals)
    return f


def _paired(role_a: str, role_b: str, metric: str):
    """Per seed: arm A's metric at the last iteration minus arm B's (the seeds both have)."""
    def f(v, last):  # paired_difference drops the seeds where either value is missing
        return paired_difference(_last(v, role_a, metric, last), _last(v, role_b, metric, last))
    return f


def _variance_vs_score(role: str):
    """Per seed: |log(score_last / score_0)| - |log(variance_last / variance_0)| (how much more the
    generalization score moves, in relative terms, than the variance)."""
    def f(v, last):
        vals = []
        for rows in v[role].values():
            g0, g1 = _at(rows, 0, "gen_score_pixel"), _at(rows, last, "gen_score_pixel")
            v0, v1 = _at(rows, 0, "variance_pixel"), _at(rows, last, "variance_pixel")
            if None not in (g0, g1, v0, v1) and min(g0, g1, v0, v1) > 0:
                vals.append(abs(math.log(g1 / g0)) - abs(math.log(v1 / v0)))
        return mean_ci(vals)
    return f


def _correlation(v, last) -> Interval:
    """Per seed: Pearson r of training-set entropy against log generalization score over every (arm,
    iteration) row of the seed (the shared iteration 0 once); averaged on Fisher's z scale."""
    rs = []
    for rows in v["*"].values():
        pts = [(e, math.log(g)) for e, g in ((number(r.get("train_entropy_pixel")), number(r.get("gen_score_pixel")))
                                              for r in rows) if e is not None and g is not None and g > 0]
        r = pearson_r([p[0] for p in pts], [p[1] for p in pts])
        if r is not None:
            rs.append(r)
    return correlation_ci(rs)


def _best_beats(par: str, metric: str):
    """Per seed: the final metric of the reference-based selector with the lowest mean over seeds (chosen after
    seeing the data, which the claim says) minus greedy's."""
    def f(v, last):
        means = {r: mean_ci(list(_last(v, r, metric, last).values())) for r in (f"{sel}_{par}" for sel in CURATION)
                 if r in v}
        means = {r: m.mean for r, m in means.items() if m.n}
        if not means:
            return mean_ci([]), ()
        best = min(means, key=means.get)
        return _paired(best, f"greedy_{par}", metric)(v, last), (best, f"greedy_{par}")
    return f


def _claims(quality: str) -> list[Claim]:
    out = [
        Claim("vanilla_entropy_falls", "In the vanilla replace loop the training set's entropy falls.",
              "train_entropy_pixel", "last iteration minus iteration 0", 0.0, "below", ("vanilla_replace",),
              _change("vanilla_replace", "train_entropy_pixel")),
        Claim("vanilla_gen_score_falls", "In the vanilla replace loop the generalization score falls.",
              "gen_score_pixel", "last iteration minus iteration 0", 0.0, "below", ("vanilla_replace",),
              _change("vanilla_replace", "gen_score_pixel")),
        Claim("entropy_predicts_gen_score",
              "Training-set entropy and log generalization score are strongly correlated (r > 0.5; the paper "
              "reports 0.91).", "train_entropy_pixel, gen_score_pixel",
              "Pearson r over all rows of a seed", 0.5, "above", (), _correlation),
        Claim("variance_moves_less_than_gen_score",
              "In the vanilla replace loop the samples' variance moves less than the generalization score.",
              "variance_pixel, gen_score_pixel", "|log change of score| - |log change of variance|", 0.0, "above",
              ("vanilla_replace",), _variance_vs_score("vanilla_replace")),
    ]
    for sel in ("greedy", "threshold"):
        sfx = "" if sel == "greedy" else "_threshold"
        out += [
            Claim(f"selection_keeps_entropy{sfx}", f"{sel} selection keeps the training set's entropy above "
                  "vanilla's (replace).", "train_entropy_pixel", f"{sel} minus vanilla at the last iteration",
                  0.0, "above", (f"{sel}_replace", "vanilla_replace"),
                  _paired(f"{sel}_replace", "vanilla_replace", "train_entropy_pixel")),
            Claim(f"selection_keeps_gen_score{sfx}", f"{sel} selection keeps the generalization score above "
                  "vanilla's (replace).", "gen_score_pixel", f"{sel} minus vanilla at the last iteration", 0.0,
                  "above", (f"{sel}_replace", "vanilla_replace"),
                  _paired(f"{sel}_replace", "vanilla_replace", "gen_score_pixel")),
            Claim(f"selection_improves_quality_replace{sfx}", f"{sel} selection lowers {quality} against the "
                  "real data below vanilla's (replace).", quality, f"{sel} minus vanilla at the last iteration",
                  0.0, "below", (f"{sel}_replace", "vanilla_replace"),
                  _paired(f"{sel}_replace", "vanilla_replace", quality)),
            Claim(f"selection_improves_quality_accumulate{sfx}", f"{sel} selection lowers {quality} against the "
                  "real data below vanilla's (accumulate).", quality, f"{sel} minus vanilla at the last iteration",
                  0.0, "below", (f"{sel}_accumulate", "vanilla_accumulate"),
                  _paired(f"{sel}_accumulate", "vanilla_accumulate", quality)),
            Claim(f"selection_keeps_real_images{sfx}", f"{sel} selection keeps a larger share of real images "
                  "than vanilla accumulate's 1/k (accumulate).", "train_real_fraction",
                  f"{sel} minus vanilla at the last iteration", 0.0, "above",
                  (f"{sel}_accumulate", "vanilla_accumulate"),
                  _paired(f"{sel}_accumulate", "vanilla_accumulate", "train_real_fraction")),
            Claim(f"larger_pool_alone_does_not_explain{sfx}", f"{sel} selection of N from 2N beats vanilla "
                  f"trained on all 2N ({quality}, replace).", quality,
                  f"{sel} minus vanilla-2N at the last iteration", 0.0, "below",
                  (f"{sel}_replace", "vanilla_replace_2n"),
                  _paired(f"{sel}_replace", "vanilla_replace_2n", quality)),
        ]
    for par, sfx in (("replace", ""), ("accumulate", "_accumulate")):
        out.append(Claim(f"best_selector_beats_greedy{sfx}", f"The reference-based selector ({', '.join(CURATION)}) "
                         f"with the best mean final {quality} beats greedy on it ({par}; the best is chosen after "
                         "seeing the data).", quality, "best selector minus greedy at the last iteration", 0.0,
                         "below", (f"greedy_{par}",), _best_beats(par, quality),
                         any_of=tuple(f"{sel}_{par}" for sel in CURATION)))
    out += [
        Claim("guidance_lowers_entropy", "Classifier-free guidance lowers the training set's entropy (vanilla "
              "replace, guided minus unguided).", "train_entropy_pixel", "guided minus unguided at the last "
              "iteration", 0.0, "below", ("vanilla_replace_guided", "vanilla_replace"),
              _paired("vanilla_replace_guided", "vanilla_replace", "train_entropy_pixel")),
        Claim("selection_restores_entropy_under_guidance", "Under guidance, greedy selection keeps the training "
              "set's entropy above vanilla's.", "train_entropy_pixel", "greedy minus vanilla, both guided, at "
              "the last iteration", 0.0, "above", ("greedy_replace_guided", "vanilla_replace_guided"),
              _paired("greedy_replace_guided", "vanilla_replace_guided", "train_entropy_pixel")),
    ]
    return out


def claim_ids(quality: str = "kid_pixel") -> list[str]:
    return [c.id for c in _claims(quality)]


def check_claims(rows: list[dict], cfg: RunConfig) -> list[dict]:
    """Every claim on the rows of a run (each row with `seed`, `arm`, `iteration`)."""
    roles = role_arms(cfg)
    by_arm: dict[str, dict[int, dict[int, dict]]] = {}
    per_seed: dict[int, list[dict]] = {}
    shared = {a.label() for a in cfg.arms if not own_iteration0(cfg, a)}
    for r in rows:
        s = r.get("seed", cfg.seed)
        by_arm.setdefault(r["arm"], {}).setdefault(s, {})[r["iteration"]] = r
        if r["iteration"] == 0 and r["arm"] in shared and any(
                x["iteration"] == 0 and x["arm"] in shared for x in per_seed.get(s, [])):
            continue  # the shared iteration 0 counts once per seed
        per_seed.setdefault(s, []).append(r)
    last = cfg.iterations - 1
    out = []
    for c in _claims(cfg.quality_metric):
        res = {"id": c.id, "claim": c.claim, "metric": c.metric, "effect_is": c.effect, "threshold": c.threshold,
               "direction": c.direction, "arms": [roles.get(r) for r in c.arms]}
        missing = [r for r in c.arms if r not in roles]
        if c.any_of and not any(r in roles for r in c.any_of):
            missing.append(" or ".join(c.any_of))
        if missing:
            out.append({**res, "effect": None, "ci_low": None, "ci_high": None, "n_seeds": 0,
                        "verdict": "skipped", "reason": f"the run has no {' and no '.join(missing)} arm"})
            continue
        values = {r: by_arm.get(roles[r], {}) for r in roles}
        values["*"] = per_seed
        iv = c.compute(values, last)
        used = c.arms
        if isinstance(iv, tuple):  # the claim chose its arms from the data
            iv, used = iv
            res["arms"] = [roles.get(r) for r in used]
        if iv.n == 0:
            out.append({**res, "effect": None, "ci_low": None, "ci_high": None, "n_seeds": 0,
                        "verdict": "skipped", "reason": "no seed has finished the rows it needs yet"})
            continue
        v = verdict(iv, c.threshold, c.direction)
        entry = {**res, "effect": iv.mean, "ci_low": iv.ci_low, "ci_high": iv.ci_high, "n_seeds": iv.n,
                 "verdict": v, "seed_sd": iv.sd}
        if c.metric.startswith("kid_"):  # the measurement's own noise, beside the spread over seeds
            spread = [_at(rows, last, "kid_std_" + c.metric[4:]) for r in used for rows in values[r].values()]
            entry["sampling_sd"] = float(np.mean([x for x in spread if x is not None])) if any(
                x is not None for x in spread) else None
        if iv.n < 2:
            entry["reason"] = "one seed: no interval"
        out.append(entry)
    return out
