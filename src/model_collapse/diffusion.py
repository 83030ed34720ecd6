"""DDPM on diffusers: UNet presets, training, and per-sample-seeded sampling.

Images are uint8 NHWC outside this module and float NCHW in [-1, 1] inside. Training draws every batch, noise
and timestep from a generator seeded by (root seed, coordinates, step), and checkpoints model, optimiser and
EMA state in safetensors, so a resumed training run continues bit for bit. Sampling draws each sample's initial
noise and every stochastic step's noise from that sample's own generator, so sample i is the same for any batch
size or number of processes.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model_collapse.errors import UserError
from model_collapse.registry import MODEL_PRESETS, SAMPLERS, UNetSpec, check_name
from model_collapse.rng import torch_generator

__all__ = ["MODEL_PRESETS", "SAMPLERS", "UNetSpec"]  # the registry's names, re-exported for library users

# ---------------------------------------------------------------------------------------------- model presets


def check_model_shape(spec: UNetSpec, image_side: int, where: str = "model") -> None:
    """The UNet halves the image side at every level but the last, and GroupNorm needs groups | channels."""
    levels = len(spec.channels)
    factor = 2 ** (levels - 1)
    if image_side % factor:
        raise UserError(
            f"{where}: image side {image_side} is not divisible by 2^(levels-1) = {factor} for {levels} levels; "
            f"use fewer levels (channels) or resize the images (image_size) to a multiple of {factor}"
        )
    bad = [c for c in spec.channels if c % spec.norm_groups]
    if bad:
        raise UserError(
            f"{where}: norm_groups = {spec.norm_groups} does not divide channel count(s) {bad}; "
            f"set norm_groups to a common divisor of {list(spec.channels)}"
        )
    if any(lv < 1 or lv > levels for lv in spec.attention_levels):
        raise UserError(f"{where}: attention levels {spec.attention_levels} outside 1..{levels}")


def preload() -> None:
    """Import diffusers' UNet now (about 3 s: it pulls in every diffusers transformer block), so that a worker pays
    it while it waits for iteration 0, not inside its first training stage."""
    import diffusers

    diffusers.UNet2DModel  # noqa: B018 - the attribute's first access imports the module (diffusers loads lazily)


def build_unet(spec: UNetSpec, image_side: int, channels: int, num_classes: int | None = None):
    """A diffusers UNet2DModel; with num_classes, a class embedding with one extra 'null' class for guidance."""
    from diffusers import UNet2DModel

    check_model_shape(spec, image_side)
    levels = len(spec.channels)
    down = tuple("AttnDownBlock2D" if lv + 1 in spec.attention_levels else "DownBlock2D" for lv in range(levels))
    up = tuple("AttnUpBlock2D" if levels - i in spec.attention_levels else "UpBlock2D" for i in range(levels))
    return UNet2DModel(
        sample_size=image_side,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=spec.channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=spec.norm_groups,
        attention_head_dim=8,
        num_class_embeds=None if num_classes is None else num_classes + 1,
    )


def pretrained_unet(path: str, image_side: int, channels: int, num_classes: int | None) -> tuple[Path, dict]:
    """The UNet2DModel folder of a diffusers `save_pretrained` directory (the model's own, or a pipeline's `unet/`)
    and its config, checked against the data and the run (one-line errors naming the mismatch)."""
    p = Path(path).expanduser()
    if not (p / "config.json").is_file() and (p / "unet" / "config.json").is_file():
        p = p / "unet"
    if not (p / "config.json").is_file():
        raise UserError(f"init_from {path}: no diffusers model there (no config.json, nor unet/config.json)")
    try:
        with open(p / "config.json", encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"init_from {p / 'config.json'}: unreadable ({str(e)[:100]})") from None
    if not isinstance(conf, dict) or conf.get("_class_name") != "UNet2DModel":
        got = conf.get("_class_name") if isinstance(conf, dict) else type(conf).__name__
        raise UserError(f"init_from {path}: a {got}, not a UNet2DModel")
    want_classes = None if num_classes is None else num_classes + 1
    for key, want, what in (("sample_size", image_side, f"the data's {image_side}x{image_side} images"),
                            ("in_channels", channels, f"the data's {channels} channel(s)"),
                            ("out_channels", channels, f"the data's {channels} channel(s)"),
                            ("num_class_embeds", want_classes,
                             "no class embedding (conditional = false)" if want_classes is None
                             else f"{num_classes} classes plus the null class (conditional = true)")):
        got = conf.get(key)
        got = got[0] if key == "sample_size" and isinstance(got, (list, tuple)) and len(set(got)) == 1 else got
        if got != want:
            raise UserError(f"init_from {path}: the model's {key} is {got}, but the run needs {want} for {what}")
    if conf.get("class_embed_type") is not None:
        raise UserError(f"init_from {path}: class_embed_type {conf['class_embed_type']!r} is not supported (class "
                        f"embeddings by num_class_embeds only)")
    if not (p / "diffusion_pytorch_model.safetensors").is_file():
        raise UserError(f"init_from {path}: no diffusion_pytorch_model.safetensors (pickled .bin weights are not "
                        f"read)")
    try:  # build it once here: a config diffusers cannot build fails now, before anything is written
        from diffusers import UNet2DModel

        load_pretrained_weights(p, UNet2DModel.from_config(conf))
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - diffusers' own errors for a foreign config: one line
        raise UserError(f"init_from {path}: diffusers cannot build its UNet ({str(e).splitlines()[0][:120]})") from None
    return p, conf


def load_pretrained_weights(p: Path, unet) -> None:
    """The weights of a `pretrained_unet` folder into a UNet of its architecture (safetensors only)."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(p / "diffusion_pytorch_model.safetensors"))
        unet.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file: one line
        raise UserError(f"init_from {p}: cannot load its weights ({str(e).splitlines()[0][:120]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"init_from {p}: {len(bad)} weight tensor(s) hold NaN or inf (first: {bad[0]})")


def make_train_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
    """The paper's forward process: 1000 steps, linear betas (1e-4 .. 0.02), epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type="epsilon", clip_sample=True)


def _sampler_classes():
    import diffusers

    return {
        "ddpm": diffusers.DDPMScheduler,
        "ddim": diffusers.DDIMScheduler,
        "dpm": diffusers.DPMSolverMultistepScheduler,
        "euler": diffusers.EulerDiscreteScheduler,
        "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler,
        "unipc": diffusers.UniPCMultistepScheduler,
    }


def make_sampler(name: str, train_scheduler):
    """The named diffusers scheduler (`registry.SAMPLERS`), configured like the training scheduler."""
    check_name("sampler", name, SAMPLERS)
    return _sampler_classes()[name].from_config(train_scheduler.config)


# ---------------------------------------------------------------------------------------------- image scaling


def to_model_space(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC (clipped, rounded)."""
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainSettings:
    train_steps: int
    batch_size: int
    lr: float
    lr_schedule: str  # "cosine" (with warm-up) or "constant" (with warm-up)
    warmup_steps: int
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    ema_decay: float | None  # None = off
    label_dropout: float  # share of labels replaced by the null class (classifier-free guidance)
    checkpoint_every: int
    grad_clip: float | None = 1.0  # None = off


FP16_INIT_SCALE = 2.0**16  # the loss scaler's first scale (torch's default)


def lr_factor(step: int, s: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to zero (diffusers' get_cosine_schedule_with_warmup) or constant."""
    if step < s.warmup_steps:
        return (step + 1) / max(1, s.warmup_steps)
    if s.lr_schedule == "constant":
        return 1.0
    progress = (step - s.warmup_steps) / max(1, s.train_steps - s.warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _optimizer(unet, s: TrainSettings, fused: bool = True):
    """AdamW; `fused` (one kernel over all parameters, on CPUs and GPUs) unless asked otherwise: torch's default on
    a CPU is a Python loop over the parameters, one small kernel launch per parameter and operation."""
    return torch.optim.AdamW(unet.parameters(), lr=s.lr, betas=(s.adam_beta1, s.adam_beta2),
                             weight_decay=s.weight_decay, fused=fused or None, foreach=None if fused else False)


def save_checkpoint(path: Path, unet, opt, ema_params: list[torch.Tensor] | None, step: int, scaler=None,
                    losses: torch.Tensor | None = None) -> None:
    """Model, optimiser, EMA, fp16 loss-scaler state and the losses so far as one safetensors file, written
    atomically."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in unet.state_dict().items()}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        st = opt.state.get(p)
        if st:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"opt.{i}.{key}"] = torch.as_tensor(st[key]).detach().clone().contiguous()
    if ema_params is not None:
        for i, p in enumerate(ema_params):
            tensors[f"ema.{i}"] = p.detach().contiguous()
    if losses is not None:
        tensors["losses"] = losses[:step].detach().float().cpu().contiguous()
    if scaler is not None and scaler.is_enabled():
        st = scaler.state_dict()
        tensors["scaler.scale"] = torch.tensor(float(st["scale"]), dtype=torch.float64)
        tensors["scaler.growth_tracker"] = torch.tensor(int(st["_growth_tracker"]), dtype=torch.int64)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, unet, opt, ema_params: list[torch.Tensor] | None, scaler=None,
                    losses: torch.Tensor | None = None) -> int:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        step = int(f.metadata()["step"])
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    params = opt.param_groups[0]["params"]
    for i, p in enumerate(params):
        if f"opt.{i}.exp_avg" in tensors:
            opt.state[p] = {key: tensors[f"opt.{i}.{key}"].clone() for key in ("exp_avg", "exp_avg_sq", "step")}
    if ema_params is not None:
        for i, p in enumerate(ema_params):
            p.copy_(tensors[f"ema.{i}"])
    if losses is not None and "losses" in tensors:  # checkpoints written before losses were kept: NaN
        losses[: len(tensors["losses"])] = tensors["losses"].to(losses.device)
    if scaler is not None and scaler.is_enabled() and "scaler.scale" in tensors:
        st = scaler.state_dict()
        st["scale"], st["_growth_tracker"] = float(tensors["scaler.scale"]), int(tensors["scaler.growth_tracker"])
        scaler.load_state_dict(st)
    return step


def save_weights(path: Path, unet) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, str(tmp))
    os.replace(tmp, path)


def load_weights(path: Path, unet) -> None:
    from safetensors.torch import load_file

    unet.load_state_dict(load_file(str(path)))


def _draw(data: torch.Tensor, lab: torch.Tensor | None, alphas: torch.Tensor, s: TrainSettings, seed: int,
          coords: Sequence[object], step: int, null_class: int | None, rank: int = 0, world: int = 1):
    """One step's noised batch (x_t, t, noise, class labels or None): the batch indices, noise, timesteps and label
    dropout drawn from the generator seeded by (seed, *coords, "train", step), on the CPU whatever the device (a
    run is the same on any hardware's random streams); under P processes, this process's slice rank::P of it."""
    dev = data.device
    g = torch_generator(seed, *coords, "train", step)
    idx = torch.randint(0, len(data), (s.batch_size,), generator=g)
    noise = torch.randn((s.batch_size,) + tuple(data.shape[1:]), generator=g)
    t = torch.randint(0, len(alphas), (s.batch_size,), generator=g)
    drop = torch.rand(s.batch_size, generator=g) < s.label_dropout
    idx, noise, t, drop = (v[rank::world].to(dev) for v in (idx, noise, t, drop))
    a = alphas[t].view(-1, 1, 1, 1)
    xt = a.sqrt() * data[idx] + (1 - a).sqrt() * noise
    cls = None
    if lab is not None:
        cls = lab[idx].clone()
        cls[drop] = null_class
    return xt, t, noise, cls


def train(
    unet,
    images: np.ndarray,
    labels: np.ndarray | None,
    s: TrainSettings,
    seed: int,
    coords: Sequence[object],
    *,
    checkpoint: Path | None = None,
    progress: Callable[[int], None] | None = None,
    on_checkpoint: Callable[[int], None] | None = None,
    null_class: int | None = None,
    save_final: bool = False,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    accelerator=None,
    fused: bool = True,
    losses: list | None = None,
):
    """Train `unet` in place for s.train_steps with the epsilon-prediction DDPM loss; returns the final weights
    to sample from (the EMA weights when EMA is on).

    Batches are drawn with replacement, and noise and timesteps drawn, from a generator seeded by
    (seed, *coords, "train", step). Under an `accelerator` (data parallel over P processes), every process draws
    the same global batch and trains on its slice b::P of it, so the data and noise seen are those of a
    one-process run; only the order in which gradients are summed differs. With `checkpoint`, training resumes
    from it (every process loads it; the main process saves it) and saves it every
    s.checkpoint_every steps (and at the end with save_final, so that a later call with more steps continues:
    with a constant learning rate, training to 1000 and then to 2000 steps equals training to 2000 at once).
    `fused`: the optimizer, gradient clipping and EMA each as one multi-tensor kernel instead of a Python loop
    over the parameters (the same arithmetic up to float rounding; `benchmarks/bench_loop.py` measures both).
    `amp_dtype`: autocast to bf16 or fp16, in one process and under an accelerator alike (the accelerator only
    syncs gradients). fp16 adds a loss scaler (`torch.amp.GradScaler`, initial scale FP16_INIT_SCALE): gradients
    are unscaled before clipping, a step with non-finite gradients is skipped and the scale halves, it doubles
    after 2,000 clean steps; its state is in the checkpoint, so resume stays exact.
    `losses`: a list that receives the training loss of every step (this process's share of the batch under an
    accelerator; kept in the checkpoint, so a resumed stage reports them all; NaN for steps a checkpoint written
    before losses were kept did not record).
    """
    compiled, unet = unet, getattr(unet, "_orig_mod", unet)  # torch.compile: run the compiled, save the module
    dev = torch.device(device) if accelerator is None else accelerator.device
    rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
    sched = make_train_scheduler()
    unet.to(dev)
    data = to_model_space(images).to(dev)
    lab = torch.as_tensor(labels).to(dev) if labels is not None else None
    params = list(unet.parameters())
    opt = _optimizer(unet, s, fused)
    ema = [p.detach().clone() for p in params] if s.ema_decay is not None else None
    scaler = torch.amp.GradScaler(dev.type, init_scale=FP16_INIT_SCALE, enabled=amp_dtype == torch.float16)
    history = torch.full((s.train_steps,), float("nan"), device=dev)  # on the device: no host sync per step
    step = 0
    if checkpoint is not None and checkpoint.exists():
        step = load_checkpoint(checkpoint, unet, opt, ema, scaler, history)
    alphas = sched.alphas_cumprod.to(dev)
    model = compiled if accelerator is None else accelerator.prepare_model(compiled)
    unet.train()
    while step < s.train_steps:
        xt, t, noise, cls = _draw(data, lab, alphas, s, seed, coords, step, null_class, rank, world)
        for group in opt.param_groups:
            group["lr"] = s.lr * lr_factor(step, s)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = model(xt, t, class_labels=cls).sample
        loss = F.mse_loss(pred.float(), noise)
        history[step] = loss.detach()
        opt.zero_grad(set_to_none=True)
        if accelerator is None:
            scaler.scale(loss).backward()
        else:
            accelerator.backward(scaler.scale(loss))
        if s.grad_clip is not None:
            scaler.unscale_(opt)  # clip the true gradients (a no-op without fp16)
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip, foreach=fused)
        scaler.step(opt)  # skipped when a gradient is inf or NaN (fp16 overflow)
        scaler.update()
        if ema is not None:
            with torch.no_grad():
                if fused:
                    torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - s.ema_decay)
                else:
                    for e, p in zip(ema, params):
                        e.lerp_(p.detach(), 1.0 - s.ema_decay)
        step += 1
        if progress is not None:
            progress(step)
        if checkpoint is not None and (step % s.checkpoint_every == 0) and step < s.train_steps:
            if rank == 0:
                save_checkpoint(checkpoint, unet, opt, ema, step, scaler, history)
            if accelerator is not None:
                accelerator.wait_for_everyone()
            if on_checkpoint is not None:
                on_checkpoint(step)
    if checkpoint is not None and save_final and rank == 0:
        save_checkpoint(checkpoint, unet, opt, ema, step, scaler, history)
    unet.eval()
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                p.copy_(e)
    if losses is not None:
        losses[:] = history.cpu().tolist()
    return unet


def train_together(
    unets: Sequence,
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray | None],
    s: TrainSettings,
    seeds: Sequence[int],
    coords: Sequence[Sequence[object]],
    *,
    checkpoints: Sequence[Path | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_checkpoint: Callable[[int, int], None] | None = None,
    null_class: int | None = None,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
    losses: Sequence[list] | None = None,
) -> None:
    """Train several UNets of one architecture in place at once, as one batched model: their weights stacked and
    the forward and backward passes vmapped over them (`torch.func`), so each convolution runs once as a grouped
    convolution for all of them. A step of 8 `tiny` models costs about 5 of one (benchmarks/bench_loop.py).

    Member i is trained as `train(unets[i], images[i], labels[i], s, seeds[i], coords[i], ...)` trains it alone: the
    same draws, its own optimiser (fused AdamW), clipping, EMA and checkpoint file (the same format: either function
    resumes the other's checkpoints), and its own losses. Only the convolutions' arithmetic differs from `train`'s
    (float rounding), and a member's result depends on nothing but itself: not on how many others train beside it
    nor in which order (tests/test_diffusion.py holds both), so a resumed run equals an uninterrupted one whatever
    has finished meanwhile. A member whose checkpoint is further on waits for the others to reach its step; a
    member training alone trains beside an unused copy of itself (a batch of one model would take the plain
    convolutions' arithmetic). `progress(i, step)` and `on_checkpoint(i, step)` name the member. One process (no
    accelerator); no fp16 (its loss scaler is shared by the whole batch, which would tie the members together).
    """
    import copy

    from torch.func import functional_call, vmap

    k = len(unets)
    if amp_dtype == torch.float16:
        raise ValueError("train_together: fp16 needs one loss scaler per model; use bf16 or train the models apart")
    if not (k == len(images) == len(labels) == len(seeds) == len(coords)):
        raise ValueError("train_together: one images array, labels entry, seed and coordinates tuple per model")
    checkpoints = list(checkpoints) if checkpoints is not None else [None] * k
    dev = torch.device(device)
    alphas = make_train_scheduler().alphas_cumprod.to(dev)
    for u in unets:
        u.to(dev)
    shapes = [[(n, p.shape, p.dtype) for n, p in u.named_parameters()] for u in unets]
    if any(sh != shapes[0] for sh in shapes):
        raise ValueError("train_together: the models differ in their parameters (one architecture only)")
    if any((y is not None) != (labels[0] is not None) for y in labels):
        raise ValueError("train_together: every model conditional or none")
    base = copy.deepcopy(unets[0]).to("meta")  # the architecture; the weights come from `stacked`
    names = [n for n, _, _ in shapes[0]]
    params = [list(u.parameters()) for u in unets]
    bufs = [dict(u.named_buffers()) for u in unets]
    buffers = {n: torch.stack([b[n] for b in bufs]) for n in bufs[0]}
    with torch.no_grad():  # one (k, ...) tensor per weight; each model's parameters become views of its row
        stacked = {n: torch.stack([ps[j] for ps in params]).requires_grad_() for j, n in enumerate(names)}
        for i, ps in enumerate(params):
            for n, p in zip(names, ps):
                p.data = stacked[n].detach()[i]
    opts = [_optimizer(u, s) for u in unets]
    emas = [[p.detach().clone() for p in ps] if s.ema_decay is not None else None for ps in params]
    history = [torch.full((s.train_steps,), float("nan"), device=dev) for _ in unets]
    start = [load_checkpoint(c, u, o, e, None, h) if c is not None and c.exists() else 0
             for c, u, o, e, h in zip(checkpoints, unets, opts, emas, history)]
    data = [to_model_space(x).to(dev) for x in images]
    labs = [torch.as_tensor(y).to(dev) if y is not None else None for y in labels]
    conditional = labs[0] is not None

    def forward(p, b, x, t, c):
        return functional_call(base, (p, b), (x, t), {"class_labels": c}).sample

    batched = vmap(forward, in_dims=(0, 0, 0, 0, 0 if conditional else None))
    for u in [*unets, base]:
        u.train()
    step = min(start)
    try:
        while step < s.train_steps:
            active = [i for i in range(k) if start[i] <= step]
            draws = [_draw(data[i], labs[i], alphas, s, seeds[i], coords[i], step, null_class) for i in active]
            rows = torch.tensor(active, device=dev)
            if len(active) == 1:  # alone beside a copy of itself that takes no gradient
                w = {n: torch.stack([v[active[0]], v[active[0]].detach()]) for n, v in stacked.items()}
                draws = draws * 2
                rows = rows.repeat(2)
            else:
                w = stacked if len(active) == k else {n: v[rows] for n, v in stacked.items()}
            b = {n: v[rows] for n, v in buffers.items()}
            x, t = torch.stack([d[0] for d in draws]), torch.stack([d[1] for d in draws])
            c = torch.stack([d[3] for d in draws]) if conditional else None
            for i in active:
                for group in opts[i].param_groups:
                    group["lr"] = s.lr * lr_factor(step, s)
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None), warnings.catch_warnings():
                # attention has no batching rule in torch 2.14: it runs model by model, correctly (and says so)
                warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                pred = batched(w, b, x, t, c)
            loss = [F.mse_loss(pred[j].float(), draws[j][2]) for j in range(len(active))]
            for v in stacked.values():
                v.grad = None
            torch.stack(loss).sum().backward()  # each model's loss reaches its own weights only, with weight 1
            with torch.no_grad():
                for j, i in enumerate(active):
                    history[i][step] = loss[j].detach()
                    for n, p in zip(names, params[i]):  # a weight no loss reached keeps no gradient, as in `train`
                        p.grad = None if stacked[n].grad is None else stacked[n].grad[i]
                    if s.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params[i], s.grad_clip, foreach=True)
                    opts[i].step()
                    if emas[i] is not None:
                        torch._foreach_lerp_(emas[i], [p.detach() for p in params[i]], 1.0 - s.ema_decay)
            step += 1
            for i in active:
                if progress is not None:
                    progress(i, step)
                if checkpoints[i] is not None and step % s.checkpoint_every == 0 and step < s.train_steps:
                    save_checkpoint(checkpoints[i], unets[i], opts[i], emas[i], step, None, history[i])
                    if on_checkpoint is not None:
                        on_checkpoint(i, step)
    finally:  # each model's weights in their own storage again (after a failure too): the EMA ones when done
        done = step >= s.train_steps
        with torch.no_grad():
            for i in range(k):
                for j, p in enumerate(params[i]):
                    p.grad = None
                    p.data = (emas[i][j] if done and emas[i] is not None else p.detach()).clone()
    for i, u in enumerate(unets):
        u.eval()
        if losses is not None:
            losses[i][:] = history[i].cpu().tolist()


# ---------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample(
    unet,
    scheduler,
    noise: torch.Tensor,
    *,
    num_steps: int,
    generators: list[torch.Generator] | None = None,
    class_labels: torch.Tensor | None = None,
    guidance: float = 0.0,
    null_class: int | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Reverse diffusion from `noise` (B, C, H, W) with any diffusers scheduler; returns x0 in [-1, 1].

    Stochastic steps (DDPM, ancestral samplers) draw sample b's noise from generators[b]. Classifier-free
    guidance with scale w: eps = eps_cond + w * (eps_cond - eps_uncond), so w = 0 is the plain conditional model.
    """
    scheduler.set_timesteps(num_steps)
    x = noise * scheduler.init_noise_sigma
    guided = class_labels is not None and guidance != 0.0
    dev = noise.device
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            if guided:
                null = torch.full_like(class_labels, null_class)
                eps_c, eps_u = unet(torch.cat([inp, inp]), t,
                                    class_labels=torch.cat([class_labels, null])).sample.float().chunk(2)
                eps = eps_c + guidance * (eps_c - eps_u)
            else:
                eps = unet(inp, t, class_labels=class_labels).sample.float()
        kw = {"generator": generators} if generators is not None and _takes_generator(scheduler) else {}
        x = scheduler.step(eps, t, x, **kw).prev_sample
    return x.clamp(-1, 1)


def _takes_generator(scheduler) -> bool:
    import inspect

    return "generator" in inspect.signature(scheduler.step).parameters


def generate(
    unet,
    sampler: str,
    num_steps: int,
    indices: Sequence[int],
    seed: int,
    coords: Sequence[object],
    shape: tuple[int, int, int],
    *,
    batch_size: int = 256,
    class_labels: np.ndarray | None = None,
    guidance: float = 0.0,
    null_class: int | None = None,
    progress: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Samples with the given indices as uint8 NHWC; sample i depends only on (seed, *coords, "sample", i) and
    `batch_size`, not on which or how many other samples are drawn, in what order, or by how many processes.

    Noise comes from CPU generators, one per sample, whatever the device. The UNet always sees exactly
    `batch_size` rows (the last chunk is padded with zeros): convolution kernels round differently for different
    batch sizes (about 1e-6, enough to flip a uint8 level), but a row's result does not depend on its position.
    """
    train_sched = make_train_scheduler()
    h, w, c = shape
    out = []
    dev = torch.device(device)
    unet.to(dev).eval()
    indices = list(indices)
    for a in range(0, len(indices), batch_size):
        batch = [int(i) for i in indices[a : a + batch_size]]
        pad = batch_size - len(batch)
        gens = [torch_generator(seed, *coords, "sample", i) for i in batch]
        gens += [torch_generator(seed, *coords, "padding", j) for j in range(pad)]
        noise = torch.cat([torch.randn((1, c, h, w), generator=g) for g in gens[: len(batch)]]
                          + [torch.zeros((pad, c, h, w))]).to(dev)
        labels = None
        if class_labels is not None:
            labels = torch.as_tensor(np.concatenate([class_labels[a : a + batch_size], np.zeros(pad, np.int64)]))
            labels = labels.to(dev)
        x = sample(unet, make_sampler(sampler, train_sched), noise, num_steps=num_steps, generators=gens,
                   class_labels=labels, guidance=guidance, null_class=null_class, amp_dtype=amp_dtype)
        out.append(to_uint8(x[: len(batch)]))
        if progress is not None:
            progress(len(batch))
    return np.concatenate(out) if out else np.zeros((0, h, w, c), np.uint8)
