"""Run configuration: frozen dataclasses, named presets in TOML files, `--set key=value` overrides.

One field per independent choice. `None` means "off" or "derived" as each field's comment says. Unknown keys,
presets, paradigms and selectors fail when the config is read, with the list of valid names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import tomllib
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

from model_collapse.errors import UserError
from model_collapse.registry import MODEL_PRESETS, PARADIGMS, SAMPLERS, SELECTORS, SPACES, check_name



@dataclass(frozen=True)
class ArmConfig:
    """One arm of a study: how each iteration's training set is built from the previous model's samples."""

    paradigm: str = "replace"  # replace | accumulate | fresh
    selector: str = "random"  # random (the vanilla loop) | greedy | threshold
    pool_factor: float = 1.0  # k: generate ceil(k * N) candidates, select N (the paper uses 2 and 5)
    train_factor: float = 1.0  # training sets after iteration 0 hold round(train_factor * N) images (2 = the
    #                            paper's "vanilla 2N" ablation with pool_factor 2); at most pool_factor
    accumulate_mix: str = "union"  # accumulate + random: "union" = N drawn uniformly from the union of real and
    #                                all earlier samples; "equal_share" = an equal share from each source (paper)
    fresh_fraction: float = 0.0  # lambda, share of each training set drawn fresh from the real data (fresh only)
    space: str = "pixel"  # feature space the selector measures distances in
    per_class: bool = False  # select within each class, keeping the pool's class shares (needs labels)
    guidance: float | None = None  # classifier-free guidance scale for this arm; None = the run's `guidance`
    name: str = ""  # label in metrics and figures; derived from the fields above when empty

    def label(self) -> str:
        if self.name:
            return self.name
        base = f"{self.paradigm}-{self.selector}"
        if self.pool_factor != 1:
            base += f"-k{self.pool_factor:g}"
        if self.train_factor != 1:
            base += f"-x{self.train_factor:g}"
        if self.accumulate_mix != "union":
            base += f"-{self.accumulate_mix}"
        if self.paradigm == "fresh":
            base += f"-lam{self.fresh_fraction:g}"
        if self.space != "pixel" and self.selector != "random":
            base += f"-{self.space}"
        if self.guidance is not None:
            base += f"-w{self.guidance:g}"
        return base


@dataclass(frozen=True)
class RunConfig:
    # data
    data: str = "digits"  # built-in name (digits, cifar10), .npy / .npz file, or image folder
    data_root: str | None = None  # local folder for built-in sets that are not shipped (cifar10)
    data_download: bool = False  # allow downloading a built-in set into data_root where a network exists
    image_size: int | None = None  # resize to this square side when loading; None = keep
    n_train: int = 128  # N, the training-set size of every iteration
    iterations: int = 5  # iterations 0 .. iterations-1; iteration 0 trains on real data
    seed: int = 0  # the study's seed (with `seeds`: unused by the studies, each takes its own)
    seeds: tuple[int, ...] | None = None  # replicates: one whole independent study per seed; None = just `seed`
    # model (preset, then optional overrides; None = the preset's value)
    model: str = "tiny"
    channels: tuple[int, ...] | None = None
    layers_per_block: int | None = None
    norm_groups: int | None = None
    attention_levels: tuple[int, ...] | None = None
    init_from: str | None = None  # a diffusers save_pretrained folder (UNet2DModel, or a pipeline with unet/):
    #                               iteration 0's model, and the architecture of every later one
    init_train: bool = False  # with init_from: fine-tune it on iteration 0's real data (else it is used as is)
    conditional: bool = False  # class-conditional UNet (needs labels)
    label_dropout: float = 0.1  # share of labels dropped to the null class while training (conditional only)
    guidance: float = 0.0  # classifier-free guidance scale w: eps = eps_c + w (eps_c - eps_u); 0 = none
    # training
    train_steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"  # cosine | constant (both after linear warm-up)
    warmup_steps: int = 50
    weight_decay: float = 1e-6
    adam_beta1: float = 0.95
    adam_beta2: float = 0.999
    ema_decay: float | None = None  # None = no EMA
    grad_clip: float | None = 1.0  # None = no clipping
    finetune: bool = False  # start each iteration from the previous model instead of a fresh one
    checkpoint_every: int = 250  # training steps between resumable checkpoints
    batch_models: bool = False  # train the arms' (and seeds') models of an iteration together as one batched
    #                            model: faster per model from about 8 models per worker (README), and its own
    #                            float rounding (part of the numerics)
    # sampling
    sampler: str = "ddim"  # ddpm | ddim | dpm | euler | euler-ancestral | unipc
    sample_steps: int = 50
    sample_batch: int = 256  # the UNet's fixed evaluation batch while sampling (part of the numerics, see README)
    # selection
    tau0: float | None = None  # threshold selector's first radius; None = 2 x the pool's median NN distance
    decay: float = 0.95  # threshold selector's radius factor per pass
    threshold_decay: str = "every_pass"  # every_pass (the authors' code) | empty_pass (the paper's Algorithm 2)
    # metrics
    n_eval: int | None = None  # generated samples measured per iteration; None = n_train
    quality_metric: str = "kid_pixel"  # the headline quality metric of the claims (a metrics-row key)
    spaces: tuple[str, ...] = ("pixel",)  # feature spaces to measure in (pixel is always measured)
    entropy_k: int = 1
    mem_ratio: float = 1.0 / 3.0  # nearest/second-nearest ratio below which a sample counts as memorized
    copy_ratio: float = 1.0 / 3.0  # copy: nearest distance below this share of the training set's median spacing
    # verdicts (see README: contraction or copying)
    copy_level: float = 0.10  # `copying` when mem_fraction or copy_fraction exceeds this
    contract_ratio_level: float = 0.8  # `contracting` needs gen_score_ratio >= this x its iteration-0 value
    contract_spacing_level: float = 0.9  # ... and the training set's spacing below this x its iteration-0 value
    # feature networks
    feature_dir: str | None = None  # folder holding local weights for dinov2-* / inception spaces
    domain_steps: int = 600  # training steps of the domain feature network
    # execution (does not change results)
    workers: int | None = None  # processes running arms side by side; None = one per arm up to the core count
    device: str | None = None  # torch device; None = cuda when available, else cpu
    mixed_precision: str = "no"  # no | bf16 | fp16 (GPU training and sampling)
    channels_last: bool = False  # channels-last memory format for the UNet (GPU)
    compile: bool = False  # torch.compile the UNet (GPU; the first steps pay for compilation)
    report: bool = True  # write the HTML report when the run ends
    log_with: str | None = None  # tensorboard | wandb: each training stage's loss curve, under RUN_DIR/tracking
    arms: tuple[ArmConfig, ...] = (
        ArmConfig("replace", "random"),
        ArmConfig("replace", "greedy", pool_factor=2.0),
    )


MAX_SAMPLES = 10**7  # images one stage may generate or train on: 10^7 8x8 images are 640 MB already
EXECUTION_KEYS = ("workers", "device", "report", "channels_last", "compile", "log_with")
ACCUMULATE_MIXES = ("union", "equal_share")
THRESHOLD_DECAYS = ("every_pass", "empty_pass")


def study_seeds(cfg: RunConfig) -> tuple[int, ...]:
    """The seeds of the independent studies of a run."""
    return cfg.seeds if cfg.seeds is not None else (cfg.seed,)


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The config of one seed's study: every random choice of it derives from `seed`."""
    return dataclasses.replace(cfg, seed=seed, seeds=None)


def arm_guidance(cfg: RunConfig, arm: ArmConfig | None) -> float:
    """The guidance scale an arm samples with (the run's unless the arm sets its own)."""
    if arm is None or arm.guidance is None:
        return cfg.guidance
    return arm.guidance


def own_iteration0(cfg: RunConfig, arm: ArmConfig | None) -> bool:
    """Whether the arm samples the shared iteration-0 model itself (its guidance differs from the run's)."""
    return arm is not None and arm_guidance(cfg, arm) != cfg.guidance


# ---------------------------------------------------------------------------------------------- parsing

_FIELD_TYPES = {f.name: f.type for f in fields(RunConfig)}
_ARM_TYPES = {f.name: f.type for f in fields(ArmConfig)}


def coerce(key: str, value: Any, typ: str, where: str) -> Any:
    """A config value checked against its field's type (`int`, `float | None`, `tuple[int, ...]`, ...)."""
    optional = "None" in typ
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise UserError(f"{where}{key}: a value is required")
    base = typ.replace(" | None", "").strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if base == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
        if base.startswith("tuple"):
            if not isinstance(value, (list, tuple)):  # a TOML list; --set's comma lists arrive as lists
                raise ValueError
        if base.startswith("tuple[int"):
            if any(isinstance(v, (bool, str)) or (isinstance(v, float) and not v.is_integer()) for v in value):
                raise ValueError
            return tuple(int(v) for v in value)
        if base.startswith("tuple[str"):
            if not all(isinstance(v, str) for v in value):
                raise ValueError
            return tuple(value)
    except (TypeError, ValueError):
        kind = {"tuple[int, ...]": "list of integers", "tuple[str, ...]": "list of names", "str": "text",
                "int": "integer", "float": "finite number", "bool": "boolean"}.get(base, base)
        raise UserError(f"{where}{key}: {value!r} is not a valid {kind}") from None
    raise UserError(f"{where}{key}: cannot set a value of type {base}")


def _arm_from_dict(d: dict, where: str) -> ArmConfig:
    if not isinstance(d, dict):
        raise UserError(f"{where}: each arm must be a table of keys, got {d!r}")
    unknown = sorted(set(d) - set(_ARM_TYPES))
    if unknown:
        raise UserError(f"{where}: unknown arm key(s) {', '.join(unknown)}; valid: {', '.join(_ARM_TYPES)}")
    return ArmConfig(**{k: coerce(k, v, _ARM_TYPES[k], f"{where}.") for k, v in d.items()})


def config_from_dict(d: dict, where: str = "") -> RunConfig:
    unknown = sorted(set(d) - set(_FIELD_TYPES))
    if unknown:
        raise UserError(f"{where}unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(_FIELD_TYPES)}")
    kw = {}
    for k, v in d.items():
        if k == "arms":
            if not isinstance(v, (list, tuple)) or not v:
                raise UserError(f"{where}arms: expected a non-empty list of arm tables")
            kw[k] = tuple(_arm_from_dict(a, f"{where}arms[{i}]") for i, a in enumerate(v))
        else:
            kw[k] = coerce(k, v, _FIELD_TYPES[k], where)
    return RunConfig(**kw)


def stored_config(stored: dict, path) -> RunConfig:
    """A run's config.json, checked as `run` checks a config; a damaged one is a one-line error naming the file."""
    try:
        cfg = config_from_dict(stored)
        validate(cfg)
    except UserError as e:
        raise UserError(f"{path}: not a valid run config ({e}); restore it") from None
    return cfg


def config_to_dict(cfg: RunConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["arms"] = [dataclasses.asdict(a) for a in cfg.arms]
    return json.loads(json.dumps(d))  # tuples -> lists, as stored on disk


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("model_collapse").joinpath("presets").iterdir()
                  if p.name.endswith(".toml"))


def _plain(value, where: str) -> None:
    """TOML dates and times have no place in a run config (JSON cannot store them): refused by name."""
    if isinstance(value, dict):
        for k, v in value.items():
            _plain(v, f"{where}{k}.")
    elif isinstance(value, list):
        for v in value:
            _plain(v, where)
    elif not isinstance(value, (str, int, float, bool)):
        raise UserError(f"{where.rstrip('.')}: a {type(value).__name__} is not a config value (use numbers, text, "
                        f"booleans or lists)")


def _read_toml(text: str, where: str) -> dict:
    try:
        d = tomllib.loads(text)
        _plain(d, f"{where}: ")
        return d
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{where}: invalid TOML ({e})") from None
    except RecursionError:
        raise UserError(f"{where}: invalid TOML (nested too deeply)") from None


def load_preset_dict(name: str) -> dict:
    if name not in preset_names():
        raise UserError(f"unknown preset {name!r}; presets: {', '.join(preset_names())} (or a .toml file)")
    text = resources.files("model_collapse").joinpath("presets", f"{name}.toml").read_text()
    return _read_toml(text, f"preset {name}")


def parse_value(text: str) -> Any:
    """A --set value: a TOML value when it parses as one (numbers, booleans, lists, inline tables), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except RecursionError:
        raise UserError(f"--set {text[:40]}...: nested too deeply") from None


def override_value(key: str, text: str, typ: str | None) -> Any:
    """A --set value for a field of type `typ`: a text field takes the text as written (`name=123` is the name
    "123"), a list field also takes comma-separated items (`seeds=0,1,2`, `spaces=pixel,domain`) or one item."""
    value = parse_value(text)
    if typ is None:
        return value
    base = typ.replace(" | None", "").strip()
    if isinstance(value, str) and value.lower() in ("none", "null") and "None" in typ:
        return value
    if base == "str" and not isinstance(value, str):
        return text
    if base.startswith("tuple") and not isinstance(value, list):
        if not isinstance(value, str):  # one item
            return [value]
        items = [v.strip() for v in value.strip("()[]").split(",")]
        if "" in items:
            raise UserError(f"--set {key}={text}: an empty item in the list")
        return [parse_value(v) for v in items] if base.startswith("tuple[int") else items
    return value


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Apply `key=value` overrides; `arms.<index or name>.<key>=value` changes one arm."""
    d = json.loads(json.dumps(d))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        if "\n" in item or "\r" in item:
            raise UserError(f"--set {item.splitlines()[0]!r}...: one key=value per --set, without line breaks")
        key, text = item.split("=", 1)
        key, text = key.strip(), text.strip()
        if key.startswith("arms."):
            parts = key.split(".")
            if len(parts) != 3:
                raise UserError(f"--set {key}: use arms.<index or name>.<key>=value")
            arms = d.setdefault("arms", config_to_dict(RunConfig())["arms"])
            sel = parts[1]
            if _digits(sel) and int(sel) < len(arms):
                arm = arms[int(sel)]
            else:
                labels = [_arm_from_dict(a, "arms").label() for a in arms]
                if sel not in labels:
                    raise UserError(f"--set {key}: no arm {sel!r}; arms: {', '.join(labels)} (or an index)")
                arm = arms[labels.index(sel)]
            arm[parts[2]] = override_value(key, text, _ARM_TYPES.get(parts[2]))
        else:
            if key not in _FIELD_TYPES:
                raise UserError(f"--set {key}: unknown config key; valid keys: {', '.join(_FIELD_TYPES)}")
            d[key] = override_value(key, text, _FIELD_TYPES[key])
    return d


def resolve_config(source: str | None, overrides: list[str] | None = None) -> RunConfig:
    """A preset name or TOML file (None = the demo preset), plus overrides, validated."""
    if source is not None and not source.strip():
        raise UserError("an empty config name; give a preset name or a .toml file (or nothing, for the demo)")
    source = source or "demo"
    if source.endswith(".toml") or Path(source).is_file():
        p = Path(source)
        if not p.is_file():
            raise UserError(f"{source}: no such config file")
        try:
            d = _read_toml(p.read_text(), source)
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{source}: cannot read ({e})") from None
        where = f"{source}: "
    else:
        d = load_preset_dict(source)
        where = f"preset {source}: "
    d = apply_overrides(d, overrides or [])
    cfg = config_from_dict(d, where)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Checks that need no data; data-dependent checks (n_train vs data size, model shape) come when loading."""
    def need(ok: bool, msg: str):
        if not ok:
            raise UserError(msg)

    need(cfg.n_train > 0, f"n_train must be > 0, got {cfg.n_train}")
    need(cfg.n_train >= 2, f"n_train must be >= 2 (entropy and spacing need two images), got {cfg.n_train}")
    need(cfg.image_size is None or 1 <= cfg.image_size <= 4096,
         f"image_size must be a positive side of at most 4096, got {cfg.image_size}")
    need(cfg.channels is None or (len(cfg.channels) >= 1 and min(cfg.channels) >= 1),
         f"channels must be positive widths, got {cfg.channels}")
    need(cfg.layers_per_block is None or cfg.layers_per_block >= 1, "layers_per_block must be >= 1")
    need(cfg.norm_groups is None or cfg.norm_groups >= 1, "norm_groups must be >= 1")
    need(cfg.device is None or re.fullmatch(r"cpu|(cuda|xpu|mps)(:\d+)?", cfg.device) is not None,
         f"device must be cpu, cuda[:N], mps[:N] or xpu[:N], got {cfg.device!r}")
    need(1 <= cfg.iterations <= 10_000, f"iterations must lie in [1, 10000], got {cfg.iterations}")
    need(cfg.model in MODEL_PRESETS, f"unknown model {cfg.model!r}; models: {', '.join(MODEL_PRESETS)}")
    need(cfg.init_from is None or (isinstance(cfg.init_from, str) and cfg.init_from.strip() != ""),
         "init_from must be a folder written by diffusers' save_pretrained")
    need(not cfg.init_train or cfg.init_from is not None, "init_train needs init_from")
    need(cfg.train_steps > 0, f"train_steps must be > 0, got {cfg.train_steps}")
    need(0 < cfg.batch_size <= 2**20, f"batch_size must lie in [1, 2^20], got {cfg.batch_size}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.lr_schedule in ("cosine", "constant"), f"lr_schedule must be cosine or constant, got {cfg.lr_schedule!r}")
    need(cfg.warmup_steps >= 0, "warmup_steps must be >= 0")
    need(cfg.checkpoint_every > 0, "checkpoint_every must be > 0")
    need(cfg.sampler in SAMPLERS, f"unknown sampler {cfg.sampler!r}; samplers: {', '.join(SAMPLERS)}")
    need(0 < cfg.sample_steps <= 1000,
         f"sample_steps must lie in [1, 1000] (the training schedule has 1,000 steps), got {cfg.sample_steps}")
    need(0 < cfg.sample_batch <= 2**20, f"sample_batch must lie in [1, 2^20], got {cfg.sample_batch}")
    need(not cfg.compile or cfg.device is None or cfg.device != "cpu",
         "compile applies to GPUs (on the CPU torch.compile costs minutes per stage and gains little)")
    need(cfg.ema_decay is None or 0 < cfg.ema_decay < 1, "ema_decay must lie in (0, 1) or be none")
    need(0 < cfg.decay < 1, f"decay must lie in (0, 1), got {cfg.decay}")
    need(cfg.tau0 is None or 0 < cfg.tau0 < math.inf, f"tau0 must be a finite number > 0, got {cfg.tau0}")
    need(cfg.n_eval is None or 1 < cfg.n_eval <= MAX_SAMPLES, f"n_eval must lie in [2, {MAX_SAMPLES:,}]")
    need(cfg.n_train <= MAX_SAMPLES, f"n_train must be at most {MAX_SAMPLES:,}, got {cfg.n_train}")
    need(cfg.entropy_k >= 1, "entropy_k must be >= 1")
    need(0 <= cfg.label_dropout < 1, "label_dropout must lie in [0, 1)")
    need(cfg.workers is None or cfg.workers >= 1, "workers must be >= 1")
    need(not (cfg.batch_models and (cfg.compile or cfg.channels_last)), "compile and channels_last apply to models "
         "trained one at a time; set batch_models = false, or compile and channels_last to false")
    need(not (cfg.batch_models and cfg.mixed_precision == "fp16"),
         "batch_models with fp16 would share one loss scaler between the models; use bf16 or batch_models = false")
    need(cfg.mixed_precision in ("no", "bf16", "fp16"), f"mixed_precision must be no, bf16 or fp16, got {cfg.mixed_precision!r}")
    need(cfg.log_with in (None, "tensorboard", "wandb"), f"log_with must be tensorboard or wandb, got {cfg.log_with!r}")
    need(cfg.log_with is None or importlib.util.find_spec(cfg.log_with) is not None,
         f"log_with = {cfg.log_with} needs the {cfg.log_with} package (pip install {cfg.log_with})")
    need(len(cfg.arms) >= 1, "at least one arm is needed")
    need(cfg.seeds is None or (len(cfg.seeds) >= 1 and len(set(cfg.seeds)) == len(cfg.seeds)
                               and min(cfg.seeds) >= 0),
         f"seeds must be distinct non-negative integers, got {cfg.seeds}")
    need(0 <= cfg.seed < 2**63, f"seed must lie in [0, 2^63), got {cfg.seed}")
    need(cfg.seeds is None or max(cfg.seeds) < 2**63, f"seeds must lie below 2^63, got {cfg.seeds}")
    measured = ["pixel"] + [s for s in cfg.spaces if s != "pixel"]
    quality = [f"{m}_{s}" for m in ("kid", "fd") for s in measured]
    need(cfg.quality_metric in quality,
         f"quality_metric must be KID or a Frechet distance of a measured space (lower is better): one of "
         f"{', '.join(quality)}; got {cfg.quality_metric!r}")
    need(cfg.threshold_decay in THRESHOLD_DECAYS,
         f"threshold_decay must be one of {', '.join(THRESHOLD_DECAYS)}, got {cfg.threshold_decay!r}")
    for s in cfg.spaces:
        check_name("space", s, SPACES)
    labels = [a.label() for a in cfg.arms]
    need(len(set(labels)) == len(labels), f"arm names must be unique, got {labels}")
    for a in cfg.arms:  # a name is a folder of the run directory: no separators, no escape, no hidden folder
        need(not a.name or re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,99}", a.name) is not None,
             f"arm name {a.name!r}: use letters, digits and _ . + = - (not starting with . or -, at most 100)")
    need(0 <= cfg.adam_beta1 < 1 and 0 <= cfg.adam_beta2 < 1,
         f"adam_beta1 and adam_beta2 must lie in [0, 1), got {cfg.adam_beta1} and {cfg.adam_beta2}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.grad_clip is None or cfg.grad_clip > 0, f"grad_clip must be > 0 or none, got {cfg.grad_clip}")
    need(cfg.domain_steps >= 1, f"domain_steps must be >= 1, got {cfg.domain_steps}")
    need(0 < cfg.mem_ratio <= 1 and 0 < cfg.copy_ratio, f"mem_ratio must lie in (0, 1] and copy_ratio be > 0, got "
                                                           f"{cfg.mem_ratio} and {cfg.copy_ratio}")
    for a in cfg.arms:
        where = f"arm {a.label()}"
        need(a.paradigm in PARADIGMS, f"{where}: unknown paradigm {a.paradigm!r}; paradigms: {', '.join(PARADIGMS)}")
        need(a.selector in SELECTORS,
             f"{where}: unknown selector {a.selector!r}; selectors: {', '.join(SELECTORS)}")
        need(a.pool_factor >= 1, f"{where}: pool_factor must be >= 1, got {a.pool_factor:g}")
        need(a.pool_factor * cfg.n_train <= MAX_SAMPLES,
             f"{where}: a pool of pool_factor x n_train = {a.pool_factor * cfg.n_train:,.0f} samples per iteration, "
             f"more than {MAX_SAMPLES:,}")
        need(0 < a.train_factor <= a.pool_factor,
             f"{where}: train_factor must lie in (0, pool_factor = {a.pool_factor:g}], got {a.train_factor:g}")
        need(a.accumulate_mix in ACCUMULATE_MIXES,
             f"{where}: accumulate_mix must be one of {', '.join(ACCUMULATE_MIXES)}, got {a.accumulate_mix!r}")
        need(a.accumulate_mix == "union" or (a.paradigm == "accumulate" and a.selector == "random"
                                             and not a.per_class),
             f"{where}: accumulate_mix = {a.accumulate_mix} applies to vanilla accumulate arms only "
             f"(paradigm accumulate, selector random, no per_class)")
        need(0 <= a.fresh_fraction < 1,
             f"{where}: fresh_fraction must lie in [0, 1) (at 1 nothing is generated or selected), got "
             f"{a.fresh_fraction:g}")
        need(a.paradigm == "fresh" or a.fresh_fraction == 0,
             f"{where}: fresh_fraction applies to the fresh paradigm only")
        check_name("space", a.space, SPACES)
        need(a.guidance is None or cfg.conditional, f"{where}: guidance needs conditional = true")
        need(not a.per_class or cfg.conditional,
             f"{where}: per_class needs conditional = true (an unconditional model's samples have no classes)")
    need(cfg.guidance == 0 or cfg.conditional, "guidance needs conditional = true")


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit also takes superscripts, which int() refuses), at most 20 of them."""
    return re.fullmatch(r"[0-9]{1,20}", text) is not None


def parse_slice(cfg: RunConfig, text: str) -> list[tuple[int, int | None]]:
    """`--only SEED`, `--only SEED/ARM` (an arm label or index) or `--only @I` (the I-th of every (seed, arm)
    slice, seed by seed, for a scheduler's job array) as [(seed, arm index or None)]."""
    seeds, labels = study_seeds(cfg), [a.label() for a in cfg.arms]
    slices = [(s, i) for s in seeds for i in range(len(labels))]
    if text.startswith("@"):
        if not _digits(text[1:]) or int(text[1:]) >= len(slices):
            raise UserError(f"--only {text}: expected @I with 0 <= I < {len(slices)} (seeds x arms)")
        return [slices[int(text[1:])]]
    seed_text, slash, arm_text = text.partition("/")
    if not _digits(seed_text) or int(seed_text) not in seeds:
        raise UserError(f"--only {text}: seed {seed_text!r} is not one of the run's seeds {list(seeds)}")
    if not slash:
        return [(int(seed_text), None)]
    if _digits(arm_text) and int(arm_text) < len(labels):
        return [(int(seed_text), int(arm_text))]
    if arm_text not in labels:
        raise UserError(f"--only {text}: no arm {arm_text!r}; arms: {', '.join(labels)} (or an index)")
    return [(int(seed_text), labels.index(arm_text))]
