"""The claims on synthetic rows with known effects: every claim holds where the data say so, fails where they
say the opposite, and is skipped, naming what is missing, where the run lacks an arm it needs."""

import math

import numpy as np
import pytest

from model_collapse.claims import ROLES, _claims, check_claims, claim_ids, role_arms
from model_collapse.config import config_from_dict, config_to_dict, resolve_config

SEEDS = range(5)
ITS = 4

# role -> arm config; every role of claims.ROLES
ARMS = {
    "vanilla_replace": {"paradigm": "replace", "selector": "random"},
    "greedy_replace": {"paradigm": "replace", "selector": "greedy", "pool_factor": 2},
    "threshold_replace": {"paradigm": "replace", "selector": "threshold", "pool_factor": 2},
    "vanilla_replace_2n": {"paradigm": "replace", "selector": "random", "pool_factor": 2, "train_factor": 2},
    "vanilla_accumulate": {"paradigm": "accumulate", "selector": "random"},
    "greedy_accumulate": {"paradigm": "accumulate", "selector": "greedy", "pool_factor": 2},
    "threshold_accumulate": {"paradigm": "accumulate", "selector": "threshold", "pool_factor": 2},
    "vanilla_replace_guided": {"paradigm": "replace", "selector": "random", "guidance": 2.0},
    "greedy_replace_guided": {"paradigm": "replace", "selector": "greedy", "pool_factor": 2, "guidance": 2.0},
    "threshold_replace_guided": {"paradigm": "replace", "selector": "threshold", "pool_factor": 2,
                                 "guidance": 2.0},
    **{f"{sel}_{par}": {"paradigm": par, "selector": sel, "pool_factor": 2}
       for sel in ("gated", "herding", "capped") for par in ("replace", "accumulate")},
}

# role -> (entropy at the last iteration, gen score at the last, quality at the last, real share at the last)
LAST = {
    "vanilla_replace": (0.0, 2.0, 0.30, 0.0),
    "greedy_replace": (8.0, 2.8, 0.20, 0.0),
    "threshold_replace": (7.0, 2.7, 0.21, 0.0),
    "vanilla_replace_2n": (2.0, 2.2, 0.28, 0.0),
    "vanilla_accumulate": (3.0, 2.4, 0.25, 0.25),
    "greedy_accumulate": (9.0, 2.9, 0.20, 0.50),
    "threshold_accumulate": (8.5, 2.8, 0.21, 0.45),
    "vanilla_replace_guided": (-5.0, 1.5, 0.35, 0.0),
    "greedy_replace_guided": (5.0, 2.5, 0.25, 0.0),
    "threshold_replace_guided": (4.0, 2.4, 0.26, 0.0),
    "gated_replace": (7.5, 2.8, 0.15, 0.0),
    "herding_replace": (7.0, 2.7, 0.17, 0.0),
    "gated_accumulate": (8.0, 2.8, 0.17, 0.55),
    "herding_accumulate": (8.0, 2.8, 0.12, 0.70),
    "capped_replace": (6.0, 2.6, 0.16, 0.0),
    "capped_accumulate": (7.0, 2.7, 0.14, 0.60),
}


def config(roles=ARMS):
    base = config_to_dict(resolve_config("smoke"))
    base.update(iterations=ITS, conditional=True, quality_metric="kid_domain", seeds=list(SEEDS),
                arms=[roles[r] for r in roles])
    return config_from_dict(base)


def rows_for(cfg, flip: str | None = None):
    """Rows of every (seed, arm, iteration): iteration 0 shared (entropy 10, score 3, variance 4), a straight
    line to each role's last values, seed-level offsets shared by the arms of a seed, and a little noise.
    `flip` reverses that role's last entropy against vanilla's."""
    rng = np.random.default_rng(0)
    roles = {v: k for k, v in role_arms(cfg).items()}
    rows = []
    for s in SEEDS:
        offset = rng.normal(0, 3)
        for a in cfg.arms:
            e1, g1, q1, real1 = LAST[roles[a.label()]]
            if flip == roles[a.label()]:
                e1 = -20.0
            for t in range(ITS):
                f = t / (ITS - 1)
                e = 10 + (e1 - 10) * f + offset + rng.normal(0, 0.1)
                rows.append({"seed": s, "arm": a.label(), "iteration": t, "train_entropy_pixel": e,
                             "gen_score_pixel": math.exp(0.03 * e + 0.8) * (3 + (g1 - 3) * f) / 3,
                             "variance_pixel": 4 - 0.1 * f + rng.normal(0, 0.01),
                             "kid_domain": 0.1 + (q1 - 0.1) * f + offset * 0.01 + rng.normal(0, 0.002),
                             "kid_std_domain": 0.001 * (s + 1),
                             "train_real_fraction": 1 + (real1 - 1) * f + rng.normal(0, 0.01) * f})
    return rows


def test_every_role_is_found_and_every_claim_holds_on_data_that_show_it():
    cfg = config()
    assert set(role_arms(cfg)) == set(ROLES)
    claims = {c["id"]: c for c in check_claims(rows_for(cfg), cfg)}
    assert list(claims) == claim_ids()
    for c in claims.values():
        assert c["verdict"] == "holds", c
        assert c["n_seeds"] == len(SEEDS) and c["ci_low"] <= c["effect"] <= c["ci_high"]
        assert {"id", "claim", "metric", "effect", "ci_low", "ci_high", "n_seeds", "verdict"} <= set(c)
        if c["metric"] == "kid_domain":  # the measurement's own spread: the mean of the rows' kid_std
            assert c["sampling_sd"] == pytest.approx(0.003)


def test_the_best_selector_is_named_and_compared_with_greedy():
    cfg = config()
    claims = {c["id"]: c for c in check_claims(rows_for(cfg), cfg)}
    labels = role_arms(cfg)
    assert claims["best_selector_beats_greedy"]["arms"] == [labels["gated_replace"], labels["greedy_replace"]]
    assert claims["best_selector_beats_greedy_accumulate"]["arms"] == [labels["herding_accumulate"],
                                                                       labels["greedy_accumulate"]]
    assert claims["best_selector_beats_greedy"]["effect"] == pytest.approx(-0.05, abs=0.01)
    without = config({r: a for r, a in ARMS.items()
                      if r not in ("gated_replace", "herding_replace", "capped_replace")})
    c = next(c for c in check_claims(rows_for(without), without) if c["id"] == "best_selector_beats_greedy")
    assert c["verdict"] == "skipped" and "gated_replace or herding_replace or capped_replace" in c["reason"]


def test_a_claim_the_data_contradict_fails():
    cfg = config()
    claims = {c["id"]: c for c in check_claims(rows_for(cfg, flip="greedy_replace"), cfg)}
    assert claims["selection_keeps_entropy"]["verdict"] == "fails"
    assert claims["selection_keeps_entropy_threshold"]["verdict"] == "holds"


@pytest.mark.parametrize("claim", _claims("kid_domain"), ids=lambda c: c.id)
def test_each_claim_is_skipped_without_an_arm_it_needs(claim):
    for role in claim.arms:
        cfg = config({r: a for r, a in ARMS.items() if r != role})
        c = next(c for c in check_claims(rows_for(cfg), cfg) if c["id"] == claim.id)
        assert c["verdict"] == "skipped" and role in c["reason"] and c["effect"] is None
    if not claim.arms:  # needs no particular arm: skipped only when no seed has rows
        cfg = config()
        c = next(c for c in check_claims([], cfg) if c["id"] == claim.id)
        assert c["verdict"] == "skipped" and "no seed" in c["reason"]


def test_one_seed_gives_effects_without_intervals():
    cfg = config()
    rows = [r for r in rows_for(cfg) if r["seed"] == 0]
    for c in check_claims(rows, cfg):
        assert c["verdict"] == "inconclusive" and c["n_seeds"] == 1 and c["ci_low"] is None
        assert c["reason"] == "one seed: no interval"


def test_shipped_claims_presets_have_every_arm_their_claims_need():
    plain, guided = resolve_config("claims"), resolve_config("claims-guided")
    assert len(plain.seeds) >= 3 and len(guided.seeds) >= 3
    need = {r for c in _claims("kid_domain") for r in c.arms}
    assert need <= set(role_arms(plain)) | set(role_arms(guided))
    assert {"vanilla_replace_guided", "greedy_replace_guided"} <= set(role_arms(guided))
