"""The paradigms: each iteration's candidate pool and training set.

* replace: the pool is the previous model's samples;
* accumulate: the real training set plus every earlier model's samples;
* fresh: the previous model's samples, and a share `fresh_fraction` of each training set drawn fresh from the
  real data.
The arm's selector then picks the training set from the pool (random = the vanilla loop). A vanilla accumulate
arm with `accumulate_mix = "equal_share"` instead draws an equal share from each source (the real set and each
earlier iteration's samples), as the paper's vanilla accumulate does. After iteration 0 a training set holds
round(train_factor * N) images. The reference-based selectors get their reference from `reference_set`. Every
image of a training set records where it came from (source iteration, -1 for real data, and its index there),
and every selection records the pool indices it chose and what decided them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model_collapse.config import ArmConfig
from model_collapse.features import extract, selection_vectors
from model_collapse.rng import derive_seed, numpy_rng
from model_collapse.rundir import RunDir, atomic_save_npz, load_npz
from model_collapse.selection import NEEDS_REFERENCE, Selection, select
from model_collapse.study import Study, pool_size


@dataclass
class Pool:
    images: np.ndarray
    labels: np.ndarray | None
    source_iteration: np.ndarray  # -1 for real images
    source_index: np.ndarray  # index in the data set (real) or in that iteration's samples


def candidate_pool(study: Study, rd: RunDir, arm: ArmConfig, t: int) -> Pool:
    """The pool an arm selects its iteration-t training set from."""
    cfg = study.cfg
    sources = range(t) if arm.paradigm == "accumulate" else [t - 1]
    imgs, labs, src_it, src_ix = [], [], [], []
    if arm.paradigm == "accumulate":
        real = load_npz(rd.iter_dir(None, 0) / "train.npz")
        imgs.append(real["images"]), labs.append(real.get("labels")), src_it.append(real["source_iteration"])
        src_ix.append(real["source_index"])
    k = pool_size(cfg, arm)
    for s in sources:
        smp = load_npz(rd.arm_sample_dir(cfg, arm, s) / "samples.npz")
        imgs.append(smp["images"][:k])
        labs.append(smp["labels"][:k] if "labels" in smp else None)
        src_it.append(np.full(k, s))
        src_ix.append(np.arange(k))
    labels = np.concatenate(labs) if all(x is not None for x in labs) else None
    return Pool(np.concatenate(imgs), labels, np.concatenate(src_it), np.concatenate(src_ix))


def reference_set(study: Study, rd: RunDir, arm: ArmConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """What the reference-based selectors (`curation`) measure candidates against: the real training set of
    iteration 0, in every paradigm. In replace no real image enters a training set after iteration 0; the real
    set only judges which candidates look real. (The iteration-0 samples would be a vacuous reference at
    iteration 1, where they are the pool itself.)"""
    z = load_npz(rd.iter_dir(None, 0) / "train.npz")
    return z["images"], z.get("labels")


def training_size(n_train: int, arm: ArmConfig) -> int:
    """Images in the arm's training sets after iteration 0."""
    return int(round(arm.train_factor * n_train))


def select_equal_share(sources: np.ndarray, n: int, seed: int) -> Selection:
    """N pool indices with an equal share from each source (largest remainder to the earliest sources), drawn
    at random within each source; the paper's vanilla accumulate."""
    names = np.unique(sources)
    quotas = np.full(len(names), n // len(names))
    quotas[: n - quotas.sum()] += 1
    rng = numpy_rng(seed, "equal-share")
    parts = []
    for src, q in zip(names, quotas):
        where = np.flatnonzero(sources == src)
        parts.append(rng.choice(where, min(q, len(where)), replace=False))
    idx = np.concatenate(parts).astype(np.int64)
    if len(idx) < n:  # a source smaller than its share: the rest uniformly from what is left
        rest = np.setdiff1d(np.arange(len(sources)), idx)
        idx = np.concatenate([idx, rng.choice(rest, n - len(idx), replace=False)])
    return Selection(idx, "equal_share", seed, {"sources": len(names)})


def build_training_set(study: Study, rd: RunDir, arm: ArmConfig | None, t: int) -> None:
    """Write train.npz (images, labels, source_iteration, source_index) and, after iteration 0, selection.npz."""
    cfg, data = study.cfg, study.data
    d = rd.iter_dir(arm.label() if arm else None, t)
    if t == 0:
        labels = data.labels[study.real_idx] if data.labels is not None else None
        atomic_save_npz(d / "train.npz", images=data.images[study.real_idx], labels=labels,
                        source_iteration=np.full(cfg.n_train, -1), source_index=study.real_idx)
        return
    label = arm.label()
    n_train = training_size(cfg.n_train, arm)
    n_fresh = int(round(arm.fresh_fraction * n_train)) if arm.paradigm == "fresh" else 0
    pool = candidate_pool(study, rd, arm, t)
    seed = derive_seed(cfg.seed, label, t, "select")
    if arm.paradigm == "accumulate" and arm.selector == "random" and arm.accumulate_mix == "equal_share":
        sel = select_equal_share(pool.source_iteration, n_train - n_fresh, seed)
    else:
        ref, ref_labels = (reference_set(study, rd, arm) if arm.selector in NEEDS_REFERENCE else (None, None))
        sel = select(selection_vectors(arm.space, pool.images, arm.selector, study.ctx), n_train - n_fresh,
                     arm.selector, seed,
                     labels=pool.labels, per_class=arm.per_class, tau0=cfg.tau0, decay=cfg.decay,
                     decay_when=cfg.threshold_decay,
                     reference=None if ref is None else extract(arm.space, ref, study.ctx),
                     reference_labels=ref_labels)
    idx = sel.indices
    images, labels = pool.images[idx], pool.labels[idx] if pool.labels is not None else None
    source_iteration, source_index = pool.source_iteration[idx], pool.source_index[idx]
    if n_fresh:
        fresh = numpy_rng(cfg.seed, label, t, "fresh").choice(len(data), n_fresh, replace=False)
        images = np.concatenate([images, data.images[fresh]])
        if labels is not None:
            labels = np.concatenate([labels, data.labels[fresh]])
        source_iteration = np.concatenate([source_iteration, np.full(n_fresh, -1)])
        source_index = np.concatenate([source_index, fresh])
    params = {k: v for k, v in sel.params.items() if not isinstance(v, (dict, np.ndarray))}
    atomic_save_npz(d / "selection.npz", indices=idx, method=np.array(sel.method), seed=np.array(seed, np.int64),
                    order=sel.params.get("order"), **{k: np.array(v) for k, v in params.items()})
    atomic_save_npz(d / "train.npz", images=images, labels=labels, source_iteration=source_iteration,
                    source_index=source_index)
