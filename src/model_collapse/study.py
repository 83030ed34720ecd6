"""What every stage of a run needs, built once per process: the config, the data, the model shape, the feature
context, and the real reference of every measured space (computed once per run and cached on disk).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from model_collapse import dist
from model_collapse.config import ArmConfig, RunConfig
from model_collapse.data import ImageSet, load_images
from model_collapse.diffusion import TrainSettings, check_model_shape, pretrained_unet
from model_collapse.errors import UserError
from model_collapse.features import SpaceContext, check_weights, extract
from model_collapse.measure import MemorizationSettings, Reference, reference_indices, reference_radii
from model_collapse.metrics import gaussian_stats
from model_collapse.registry import MODEL_PRESETS, UNetSpec, resolve_device
from model_collapse.rng import numpy_rng
from model_collapse.rundir import RunDir, atomic_save_npz, load_npz, set_aside, whole

SHARED = "shared"  # the arm coordinate of iteration 0, which all arms share


@dataclass
class Study:
    """A run's fixed parts; `_cache` holds arrays computed once per run (see `_cached`)."""

    cfg: RunConfig
    data: ImageSet
    real_idx: np.ndarray  # the iteration-0 training subset (indices into data)
    spec: UNetSpec
    num_classes: int | None
    ctx: SpaceContext
    pretrained: tuple[Path, dict] | None = None  # init_from: the UNet folder and its config
    _cache: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.data.shape

    @property
    def device(self) -> str:
        return resolve_device(self.cfg.device)

    @property
    def n_eval(self) -> int:
        return self.cfg.n_eval or self.cfg.n_train

    @property
    def memorization_settings(self) -> MemorizationSettings:
        c = self.cfg
        return MemorizationSettings(c.entropy_k, c.mem_ratio, c.copy_ratio, c.device)

    def train_settings(self) -> TrainSettings:
        c = self.cfg
        return TrainSettings(c.train_steps, c.batch_size, c.lr, c.lr_schedule, c.warmup_steps, c.weight_decay,
                             c.adam_beta1, c.adam_beta2, c.ema_decay, c.label_dropout, c.checkpoint_every,
                             c.grad_clip)

    def _cached(self, name: str, compute: Callable[[], dict], keys: dict[str, int]) -> dict:
        """Arrays computed once per run: kept in memory, and in RUN_DIR/features/<name>.npz for the other
        processes and for resumes. A file that does not load, or lacks one of `keys` (name: rank) as a float
        array of that rank, is set aside and computed again."""
        if name not in self._cache:
            path = RunDir(Path(self.ctx.run_dir)).feature_cache(name) if self.ctx.run_dir else None
            loaded = load_npz(path) if path is not None and whole(path, "computing it again") else None
            if loaded is not None and not all(k in loaded and loaded[k].ndim == nd and loaded[k].dtype.kind == "f"
                                              for k, nd in keys.items()):
                set_aside(path, "computing it again")
                loaded = None
            if loaded is not None:
                self._cache[name] = loaded
            else:
                arrays = compute()
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_save_npz(path, **arrays)
                self._cache[name] = arrays
        return self._cache[name]

    def reference(self, space: str) -> Reference:
        """The real data as every iteration is measured against it: statistics of all real images, and the
        seeded size-matched subset (`measure.reference_indices`) with its k-NN radii."""
        stats = self._cached(f"real_stats_{space}",
                             lambda: dict(zip(("mu", "sigma"), gaussian_stats(extract(space, self.data.images,
                                                                                      self.ctx)))),
                             {"mu": 1, "sigma": 2})

        def subset():
            pick = reference_indices(len(self.data), self.n_eval, self.cfg.seed)
            return {"features": extract(space, self.data.images[pick], self.ctx)}

        feats = self._cached(f"real_reference_{space}", subset, {"features": 2})["features"]
        mu, sigma = stats["mu"], stats["sigma"]
        if not mu.shape[0] == sigma.shape[0] == sigma.shape[1] == feats.shape[1]:  # caches of different spaces
            for name in (f"real_stats_{space}", f"real_reference_{space}"):
                self._cache.pop(name)
                if self.ctx.run_dir:
                    set_aside(RunDir(Path(self.ctx.run_dir)).feature_cache(name), "computing it again")
            return self.reference(space)
        key = f"real_reference_radii_{space}"
        if key not in self._cache:
            self._cache[key] = reference_radii(feats, self.cfg.device)
        return Reference(stats["mu"], stats["sigma"], feats, self._cache[key])


def model_spec(cfg: RunConfig) -> UNetSpec:
    base = MODEL_PRESETS[cfg.model]
    return UNetSpec(
        cfg.channels or base.channels,
        cfg.layers_per_block or base.layers_per_block,
        cfg.norm_groups or base.norm_groups,
        cfg.attention_levels if cfg.attention_levels is not None else base.attention_levels,
    )


def deterministic_kernels() -> None:
    """The settings that make GPU runs repeat: deterministic cuDNN convolutions without autotuning, full-precision
    float32 products (no TF32, which would also void the selection kernels' rounding bounds), deterministic
    algorithms where torch has them (a warning where it has none), and cuBLAS's fixed workspace. Set for the whole
    process, before the first CUDA call; on a CPU they change nothing."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if torch.cuda.is_available():  # on a CPU every kernel used here repeats already
        torch.use_deterministic_algorithms(True, warn_only=True)


def check_device(device: str | None) -> None:
    """A device that this machine does not have, refused before the run directory exists."""
    if not device or device == "cpu":
        return
    import torch

    kind, _, index = device.partition(":")
    backend = getattr(torch, kind, None)
    available = backend is not None and backend.is_available()
    count = (backend.device_count() if kind != "mps" else 1) if available else 0
    if int(index or 0) >= count:
        raise UserError(f"device {device}: this machine has {count} {kind} device(s)")


MAX_CLASSES = 100_000


def prepare(cfg: RunConfig, run_dir: str | None = None) -> Study:
    """Load and check the data against the config; raises UserError before anything is written."""
    check_device(cfg.device)
    data = load_images(cfg.data, cfg.data_root, cfg.data_download, cfg.image_size)
    n, h, w, c = data.images.shape
    if cfg.n_train > n:
        raise UserError(f"n_train = {cfg.n_train} is larger than the data ({n} images in {cfg.data})")
    if h != w:
        raise UserError(f"{cfg.data}: images are {h}x{w}; the UNet needs square images (set image_size)")
    spec = model_spec(cfg)
    num_classes = None
    if cfg.conditional:
        if data.labels is None:
            raise UserError(f"conditional = true needs labels, and {cfg.data} has none")
        num_classes = int(data.labels.max()) + 1
        if num_classes > MAX_CLASSES:
            raise UserError(f"{cfg.data}: labels up to {num_classes - 1:,}; a conditional model embeds every class "
                            f"from 0 to the largest label (at most {MAX_CLASSES:,}): number the classes 0..K-1")
    pretrained = pretrained_unet(cfg.init_from, h, c, num_classes) if cfg.init_from else None
    if pretrained is not None and cfg.batch_models and (pretrained[1].get("dropout") or 0) > 0:
        raise UserError(f"init_from {cfg.init_from}: its UNet has dropout {pretrained[1]['dropout']}, which models "
                        f"trained together cannot draw per model; set batch_models = false")
    if pretrained is None:
        check_model_shape(spec, h, where=f"model {cfg.model}")
    for a in cfg.arms:
        if a.per_class and data.labels is None:
            raise UserError(f"arm {a.label()}: per_class selection needs labels, and {cfg.data} has none")
    check_weights([*cfg.spaces, *(a.space for a in cfg.arms if a.selector != "random")], cfg.feature_dir, load=True)
    if cfg.batch_size % dist.world():
        raise UserError(f"batch_size = {cfg.batch_size} does not divide among {dist.world()} processes: each trains "
                        f"on an equal slice of the global batch (use a multiple of {dist.world()})")
    deterministic_kernels()
    real_idx = numpy_rng(cfg.seed, "real-subset").choice(n, cfg.n_train, replace=False)
    ctx = SpaceContext(cfg.feature_dir, run_dir, data.images, data.labels, cfg.seed, cfg.domain_steps, cfg.device)
    return Study(cfg, data, np.sort(real_idx), spec, num_classes, ctx, pretrained)


def pool_size(cfg: RunConfig, arm: ArmConfig) -> int:
    return int(math.ceil(arm.pool_factor * cfg.n_train))


def n_samples(study: Study, arm: ArmConfig | None, t: int) -> int:
    """Samples drawn at iteration t: the next iteration's pool (none after the last) and the evaluation set."""
    cfg = study.cfg
    need = study.n_eval
    if t < cfg.iterations - 1:
        arms = cfg.arms if arm is None else (arm,)
        need = max(need, max(pool_size(cfg, a) for a in arms))
    return need


def arm_label(arm: ArmConfig | None) -> str:
    """The arm coordinate of seeds and progress: the arm's label, or SHARED for iteration 0."""
    return arm.label() if arm else SHARED
