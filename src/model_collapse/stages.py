"""The stages of one (arm, iteration) after its training set exists: train, sample, measure. Each reads its
inputs from the run directory and writes one file atomically; under several processes training is data parallel
and sampling splits by sample index, and the main process writes.
"""

from __future__ import annotations

import numpy as np
import torch

from model_collapse import diffusion as D
from model_collapse import dist, tracking
from model_collapse.config import ArmConfig, arm_guidance, own_iteration0
from model_collapse.features import classify, extract
from model_collapse.measure import measure_space, row_keys
from model_collapse.rng import derive_seed
from model_collapse.rundir import RunDir, atomic_save_npz, load_npz
from model_collapse.study import Study, arm_label, n_samples

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def new_unet(study: Study, label: str, t: int):
    """A freshly initialised UNet for (arm, iteration): its weights derive from the seed and coordinates."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(study.cfg.seed, label, t, "init"))
        if study.pretrained is not None:  # init_from: its architecture, for every iteration
            from diffusers import UNet2DModel

            unet = UNet2DModel.from_config(study.pretrained[1])
        else:
            unet = D.build_unet(study.spec, study.shape[0], study.shape[2], study.num_classes)
    if study.cfg.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def _fast(study: Study, unet):
    """The module to run: compiled when asked (weights stay shared with `unet`, which is what gets saved)."""
    return torch.compile(unet) if study.cfg.compile else unet


def _start_unet(study: Study, rd: RunDir, arm: ArmConfig | None, t: int):
    """The UNet a stage's training starts from: fresh (seeded by its coordinates), or with `finetune` the previous
    iteration's model."""
    label = arm_label(arm)
    unet = new_unet(study, label, t)
    if study.cfg.finetune and t > 0:
        D.load_weights(rd.iter_dir(label if t > 1 else None, t - 1) / "model.safetensors", unet)
    return unet


def _save_trained(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, unet, losses: list[float]) -> None:
    """A trained stage's losses, then its model (a finished stage has both); its checkpoint goes; then the
    tracker's copy of the losses (a tracker's failure costs a warning, never the stage). Main process only."""
    cfg = study.cfg
    d = rd.iter_dir(arm.label() if arm else None, t)
    rd.save_losses(d, np.asarray(losses, dtype=np.float32))
    D.save_weights(d / "model.safetensors", unet)
    (d / "train_state.safetensors").unlink(missing_ok=True)
    if cfg.log_with:
        tracking.log_losses(cfg.log_with, rd.tracking_dir, tracking.run_name(cfg.seed, arm_label(arm), t), losses)


def train_model(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, bar=None, on_checkpoint=None) -> None:
    cfg = study.cfg
    label = arm_label(arm)
    d = rd.iter_dir(arm.label() if arm else None, t)
    tr = load_npz(d / "train.npz")
    unet = _start_unet(study, rd, arm, t)
    if t == 0 and study.pretrained is not None:
        D.load_pretrained_weights(study.pretrained[0], unet)
        if not cfg.init_train:  # the given model is iteration 0's: nothing to train
            if dist.is_main():
                rd.save_losses(d, np.zeros(0, dtype=np.float32))
                D.save_weights(d / "model.safetensors", unet)
            return
    labels = tr.get("labels") if cfg.conditional else None
    hook = (lambda step: on_checkpoint(label, t, step)) if on_checkpoint else None
    acc = dist.accelerator()
    losses: list[float] = []
    D.train(_fast(study, unet), tr["images"], labels, study.train_settings(), cfg.seed, (label, t),
            checkpoint=d / "train_state.safetensors", progress=(lambda step: bar.update(1)) if bar else None,
            on_checkpoint=hook, null_class=study.num_classes, device=study.device, accelerator=acc,
            amp_dtype=AMP.get(cfg.mixed_precision), losses=losses)
    unet.cpu()
    if dist.is_main():
        _save_trained(study, rd, arm, t, unet, losses)


def train_models_together(members: list[tuple[Study, RunDir, ArmConfig, int]], bars=None,
                          on_checkpoint=None) -> None:
    """Train the models of several (arm, iteration >= 1) stages at once as one batched model
    (`diffusion.train_together`, `batch_models = true`): each is the model `train_model` would make of the same
    stage up to float rounding, and depends on nothing but its own stage. Its stages may belong to different seeds
    (one study each); one process."""
    unets, images, labels = [], [], []
    for study, rd, arm, t in members:
        tr = load_npz(rd.iter_dir(arm.label(), t) / "train.npz")
        unets.append(_start_unet(study, rd, arm, t))
        images.append(tr["images"])
        labels.append(tr.get("labels") if study.cfg.conditional else None)
    study = members[0][0]
    losses: list[list[float]] = [[] for _ in members]

    def hook(i: int, step: int) -> None:
        on_checkpoint(arm_label(members[i][2]), members[i][3], step)

    D.train_together(unets, images, labels, study.train_settings(), [st.cfg.seed for st, *_ in members],
                     [(arm_label(arm), t) for _, _, arm, t in members],
                     checkpoints=[rd.iter_dir(arm.label(), t) / "train_state.safetensors" for _, rd, arm, t in members],
                     progress=(lambda i, step: bars[i].update(1)) if bars else None,
                     on_checkpoint=hook if on_checkpoint is not None else None,
                     null_class=study.num_classes, device=study.device, amp_dtype=AMP.get(study.cfg.mixed_precision),
                     losses=losses)
    for (study, rd, arm, t), unet, lost in zip(members, unets, losses):
        unet.cpu()
        _save_trained(study, rd, arm, t, unet, lost)


def sample_model(study: Study, rd: RunDir, arm: ArmConfig | None, t: int, bar=None) -> None:
    cfg = study.cfg
    label = arm_label(arm)
    unet = new_unet(study, label, t)
    D.load_weights(rd.iter_dir(arm.label() if arm else None, t) / "model.safetensors", unet)
    d = rd.arm_sample_dir(cfg, arm, t)
    if t == 0 and own_iteration0(cfg, arm):
        label = arm.label()  # its own samples: its own noise
    n = n_samples(study, arm, t)
    class_labels = None
    if study.num_classes is not None:
        class_labels = np.arange(n) % study.num_classes  # sample i is drawn for class i mod C
    # under several processes, process r draws samples r, r + P, r + 2P, ...: each sample's noise depends on its
    # index only, so the samples are those of one process
    mine = np.arange(dist.rank(), n, dist.world())
    images = D.generate(_fast(study, unet), cfg.sampler, cfg.sample_steps, mine, cfg.seed, (label, t), study.shape,
                        batch_size=cfg.sample_batch,
                        class_labels=None if class_labels is None else class_labels[mine],
                        guidance=arm_guidance(cfg, arm), null_class=study.num_classes,
                        progress=(lambda k: bar.update(k * dist.world())) if bar else None, device=study.device,
                        amp_dtype=AMP.get(cfg.mixed_precision))
    if dist.world() == 1:
        atomic_save_npz(d / "samples.npz", images=images, labels=class_labels)
        return
    atomic_save_npz(d / f"samples.part{dist.rank()}.npz", images=images)
    dist.barrier()
    if dist.is_main():
        full = np.empty((n,) + tuple(study.shape), dtype=np.uint8)
        for r in range(dist.world()):
            full[r :: dist.world()] = load_npz(d / f"samples.part{r}.npz")["images"]
        atomic_save_npz(d / "samples.npz", images=full, labels=class_labels)
        for r in range(dist.world()):
            (d / f"samples.part{r}.npz").unlink()


def measure_stage(study: Study, rd: RunDir, arm: ArmConfig | None, t: int) -> dict:
    """Metrics of (arm, iteration t): its training set and its model's first n_eval samples, in every space,
    through `measure.measure_space`. Caches the feature vectors and the pixel neighbours for the report."""
    cfg = study.cfg
    tr = load_npz(rd.iter_dir(arm.label() if arm else None, t) / "train.npz")
    d = rd.arm_sample_dir(cfg, arm, t)
    samples = load_npz(d / "samples.npz")
    gen = samples["images"][: study.n_eval]
    m: dict = {"n_train": int(len(tr["images"])), "n_generated": int(len(gen)),
               "train_real_fraction": float(np.mean(tr["source_iteration"] < 0))}
    for s in ["pixel"] + [s for s in cfg.spaces if s != "pixel"]:
        ft, fg = extract(s, tr["images"], study.ctx), extract(s, gen, study.ctx)
        if s != "pixel":  # cached so that reports and later analyses never recompute them
            atomic_save_npz(d / f"features_{s}.npz", train=ft, generated=fg)
        metrics, sc = measure_space(ft, fg, study.reference(s), cfg.seed, study.memorization_settings)
        m.update(row_keys(metrics, s))
        if s == "pixel":  # `nearest` indexes the training set's distinct rows (metrics.distinct_rows)
            atomic_save_npz(d / "neighbours_pixel.npz", nearest=sc.nearest, d1=sc.d1, d2=sc.d2)
    if study.num_classes is not None:
        # what the samples look like, by the domain classifier: per-class counts, and the share that looks like
        # the class it was sampled for (guidance raises it, at the cost of diversity)
        asked = samples["labels"][: study.n_eval]
        seen = classify(gen, study.ctx)
        m["gen_class_counts"] = np.bincount(seen, minlength=study.num_classes).tolist()
        m["gen_class_agreement"] = float(np.mean(seen == asked))
    return m
