"""Contraction vs copying: each situation, built from small synthetic data, gets its verdict."""

import json

import numpy as np
import pytest

from model_collapse.config import RunConfig
from model_collapse.metrics import generalization_score, kl_entropy
from model_collapse.verdict import add_verdict, decide


def row_from(train, gen, iteration):
    ent = kl_entropy(train)
    sc = generalization_score(gen, train, train_nn=ent.nn)
    return {"arm": "a", "iteration": iteration, "train_entropy_pixel": ent.entropy,
            "train_spacing_pixel": sc.train_spacing, "gen_score_pixel": sc.gen_score,
            "gen_score_ratio_pixel": sc.gen_score_ratio, "mem_fraction_pixel": sc.mem_fraction,
            "copy_fraction_pixel": sc.copy_fraction}


def sample_like(train, rng, n, scale):
    """A 'model' that generates new points from the training set's distribution, no closer to a training
    point than training points are to each other: jitter of the training set's own spacing."""
    base = train[rng.integers(0, len(train), n)]
    return base + rng.normal(size=base.shape) * scale


def test_contracting_training_set_is_contracting_not_copying(rng):
    d = 8
    train0 = rng.normal(size=(200, d))
    gen0 = rng.normal(size=(200, d))  # a generalizing model: new draws from the same distribution
    # later iterations: the training set collapses into a few tight clusters, samples land inside them
    centres = rng.normal(size=(6, d)) * 1.5
    train3 = centres[rng.integers(0, 6, 200)] + rng.normal(size=(200, d)) * 0.15
    spacing = kl_entropy(train3).mean_nn
    gen3 = sample_like(train3, rng, 200, spacing / np.sqrt(d) * 1.2)
    cfg = RunConfig()
    history = []
    r0, r3 = row_from(train0, gen0, 0), row_from(train3, gen3, 3)
    add_verdict(r0, history, cfg)
    history.append(r0)
    add_verdict(r3, history, cfg)
    assert r0["verdict"] == "stable"
    assert r3["gen_score_pixel"] < r0["gen_score_pixel"]  # the raw score falls ...
    assert r3["verdict"] == "contracting", r3["verdict_evidence"]  # ... but nothing is copied
    ev = r3["verdict_evidence"]
    assert ev["train_spacing"] < ev["train_spacing_it0"] and ev["train_entropy"] < ev["train_entropy_it0"]
    json.dumps(r3)  # evidence is plain JSON


def test_model_output_that_copies_training_points_is_copying(rng):
    d = 8
    train = rng.normal(size=(200, d))
    copies = train[rng.integers(0, 200, 60)] + rng.normal(size=(60, d)) * 1e-3
    fresh = rng.normal(size=(140, d))
    row = row_from(train, np.concatenate([copies, fresh]), 2)
    base = row_from(train, rng.normal(size=(200, d)), 0)
    v, ev = decide(row, base, copy_level=0.10, contract_ratio_level=0.8)
    assert v == "copying"
    assert ev["mem_fraction"] == pytest.approx(0.3, abs=0.02)


def test_stable_when_nothing_changes(rng):
    d = 8
    t0, t1 = rng.normal(size=(200, d)), rng.normal(size=(200, d))
    r0, r1 = row_from(t0, rng.normal(size=(200, d)), 0), row_from(t1, rng.normal(size=(200, d)), 1)
    v, _ = decide(r1, r0, 0.10, 0.8)
    assert v == "stable"


def test_thresholds_come_from_the_config(rng):
    d = 8
    train = rng.normal(size=(200, d))
    gen = np.concatenate([train[:10] + 1e-4, rng.normal(size=(190, d))])  # 5% copies
    row = row_from(train, gen, 1)
    base = row_from(train, rng.normal(size=(200, d)), 0)
    assert decide(row, base, 0.10, 0.8)[0] != "copying"
    assert decide(row, base, 0.02, 0.8)[0] == "copying"
