"""Feature spaces: a validated registry mapping a name to an extractor, shared by every metric and selector.

An extractor maps uint8 NHWC images to float32 vectors (N, d):
* `pixel`: the flattened image scaled to [0, 1];
* `domain`: a small CNN trained by this tool on the real data of the run (a classifier when labels exist, else an
  autoencoder), deterministic for a seed, saved as safetensors; the offline space for small data sets;
* `dinov2-small`, `dinov2-base`, `dinov2-large`, `dinov2-giant`: the CLS token of DINOv2 (transformers), with the
  model's own preprocessing, from a local folder or an existing Hugging Face cache;
* `inception`: the 2048-d pool features of the standard FID Inception-v3 (torch-fidelity's port of the TF graph),
  so a Frechet distance in this space is FID comparable with published numbers.
No weights are ever downloaded here, and nothing is unpickled: weights load from safetensors, or through
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from model_collapse import registry
from model_collapse.data import pixel_vectors, short_error
from model_collapse.errors import UserError
from model_collapse.progress import Progress, or_silent
from model_collapse.registry import check_name, resolve_device
from model_collapse.rundir import set_aside, whole
from model_collapse.workers import torch_threads


@dataclass(frozen=True)
class SpaceContext:
    """What an extractor may need beyond the images: where to find weights, the run's real data and seed."""

    feature_dir: str | None = None  # folder with local weights (dinov2-*/, inception weights)
    run_dir: str | None = None  # where the domain network is saved
    real_images: np.ndarray | None = None  # the data the domain network learns from
    real_labels: np.ndarray | None = None
    seed: int = 0
    domain_steps: int = 600
    device: str | None = None
    batch_size: int = 64
    progress: Progress | None = None  # hears of every batch of a network's feature pass


def _batches(ctx: SpaceContext, what: str, n: int, size: int):
    """Batch starts 0, size, 2 size, ... below n, each reported to the context's progress when done."""
    progress = or_silent(ctx.progress)
    progress.start(f"{what} features, {n} images", n)
    for a in range(0, n, size):
        yield a
        progress.advance(min(size, n - a))
    progress.close()


def _device(ctx: SpaceContext) -> torch.device:
    return torch.device(resolve_device(ctx.device))


_CACHE: dict = {}  # loaded networks, per process, keyed by (space, location)


# ---------------------------------------------------------------------------------------------- domain network


class DomainNet(torch.nn.Module):
    """A small CNN: three conv blocks, global average pool, a 64-d embedding (the features), and a head
    (class logits, or a decoder back to the image for the autoencoder objective)."""

    def __init__(self, channels: int, side: int, num_classes: int | None, width: int = 32, dim: int = 64):
        super().__init__()
        c = width
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, c, 3, padding=1), torch.nn.GroupNorm(8, c), torch.nn.SiLU(),
            torch.nn.Conv2d(c, 2 * c, 3, padding=1, stride=2 if side >= 8 else 1), torch.nn.GroupNorm(8, 2 * c),
            torch.nn.SiLU(),
            torch.nn.Conv2d(2 * c, 2 * c, 3, padding=1, stride=2 if side >= 16 else 1), torch.nn.GroupNorm(8, 2 * c),
            torch.nn.SiLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * c, dim),
        )
        self.head = torch.nn.Linear(dim, num_classes) if num_classes else torch.nn.Linear(dim, channels * side * side)

    def forward(self, x):
        return self.body(x)


def train_domain_net(images: np.ndarray, labels: np.ndarray | None, seed: int, steps: int) -> DomainNet:
    """Train the domain network deterministically (seeded init, batches and augmentation-free steps), on one
    thread whatever the process's thread count: torch's CPU kernels sum in another order on two threads, and the
    network must be the same whichever process of a run trains it (a worker, or the run's own at every core)."""
    with torch_threads(1):
        return _train_domain_net(images, labels, seed, steps)


def _train_domain_net(images: np.ndarray, labels: np.ndarray | None, seed: int, steps: int) -> DomainNet:
    from model_collapse.diffusion import to_model_space
    from model_collapse.rng import torch_generator

    n, h, w, c = images.shape
    num_classes = int(labels.max()) + 1 if labels is not None else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DomainNet(c, h, num_classes)
    x = to_model_space(images)
    y = torch.as_tensor(labels) if labels is not None else None
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    for step in range(steps):
        g = torch_generator(seed, "domain", step)
        idx = torch.randint(0, n, (min(128, n),), generator=g)
        z = net(x[idx])
        if y is not None:
            loss = torch.nn.functional.cross_entropy(net.head(z), y[idx])
        else:
            loss = torch.nn.functional.mse_loss(net.head(z), x[idx].flatten(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    return net


def _domain_path(ctx: SpaceContext) -> Path | None:
    base = ctx.run_dir or ctx.feature_dir
    return Path(base) / "features" / "domain.safetensors" if base else None


def domain_network(images_for_shape: np.ndarray, ctx: SpaceContext) -> DomainNet:
    from safetensors.torch import load_file, save_file

    if ctx.real_images is None:
        raise UserError("the domain space needs real images to learn from (run it inside a run, or pass --ref)")
    real = ctx.real_images
    num_classes = int(ctx.real_labels.max()) + 1 if ctx.real_labels is not None else None
    path = _domain_path(ctx)
    key = ("domain", str(path), ctx.seed, real.shape, ctx.domain_steps)
    if key in _CACHE:
        return _CACHE[key]
    net = None
    if path is not None and whole(path, "training the domain network again"):
        with torch.random.fork_rng(devices=[]):
            net = DomainNet(real.shape[3], real.shape[1], num_classes)
        try:
            net.load_state_dict(load_file(str(path)))
            net.eval()
        except RuntimeError:  # whole, but the weights of another network
            set_aside(path, "training the domain network again")
            net = None
    if net is None:
        net = train_domain_net(real, ctx.real_labels, ctx.seed, ctx.domain_steps)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
            os.replace(tmp, path)
    _CACHE[key] = net
    return net


def _domain(images: np.ndarray, ctx: SpaceContext) -> np.ndarray:
    from model_collapse.diffusion import to_model_space

    if ctx.real_images is not None and images.shape[1:] != ctx.real_images.shape[1:]:
        raise UserError(f"domain space: images {images.shape[1:]} differ from the real data {ctx.real_images.shape[1:]}")
    net = domain_network(images, ctx)
    out = []
    with torch.no_grad():
        for a in _batches(ctx, "domain", len(images), 512):
            out.append(net(to_model_space(images[a : a + 512])).numpy())
    return np.concatenate(out).astype(np.float32)


def classify(images: np.ndarray, ctx: SpaceContext) -> np.ndarray:
    """Class predictions of the domain network (trained as a classifier on the labelled real data)."""
    from model_collapse.diffusion import to_model_space

    if ctx.real_labels is None:
        raise UserError("classifying generated images needs labelled real data")
    net = domain_network(images, ctx)
    with torch.no_grad():
        return np.concatenate([net.head(net(to_model_space(images[a : a + 512]))).argmax(1).numpy()
                               for a in range(0, len(images), 512)])


# ---------------------------------------------------------------------------------------------- DINOv2

DINOV2 = {"dinov2-small": "facebook/dinov2-small", "dinov2-base": "facebook/dinov2-base",
          "dinov2-large": "facebook/dinov2-large", "dinov2-giant": "facebook/dinov2-giant"}


def _dinov2_source(name: str, feature_dir: str | None) -> str:
    """Where DINOv2 weights are: a folder under feature_dir, or the repository name when the Hugging Face cache
    holds it; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    repo = DINOV2[name]
    tried = []
    if feature_dir:
        for c in (Path(feature_dir) / name, Path(feature_dir) / repo.split("/")[1]):
            tried.append(str(c))
            if (c / "config.json").is_file():
                return str(c)
    tried.append(f"Hugging Face cache ({repo})")
    if isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return repo
    raise UserError(f"{name}: weights of {repo} not found (looked in {'; '.join(tried)}); download them where a "
                    f"network exists and pass the folder with feature_dir / --feature-dir")


def load_dinov2(name: str, ctx: SpaceContext):
    """DINOv2 model and image processor from feature_dir/<name>, or the Hugging Face cache; never downloads."""
    from transformers import AutoImageProcessor, AutoModel

    source = _dinov2_source(name, ctx.feature_dir)
    try:
        return (AutoModel.from_pretrained(source, local_files_only=True),
                AutoImageProcessor.from_pretrained(source, local_files_only=True))
    except Exception as e:  # a damaged folder fails in many ways (JSON, safetensors, shapes, missing files)
        raise UserError(f"{source}: not loadable {name} weights ({short_error(e)})") from None


def _dinov2(name: str) -> Callable[[np.ndarray, SpaceContext], np.ndarray]:
    def extract(images: np.ndarray, ctx: SpaceContext) -> np.ndarray:
        key = (name, ctx.feature_dir)
        if key not in _CACHE:
            model, proc = load_dinov2(name, ctx)
            _CACHE[key] = (model.to(_device(ctx)).eval(), proc)
        model, proc = _CACHE[key]
        rgb = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images
        out = []
        with torch.no_grad():
            for a in _batches(ctx, name, len(rgb), ctx.batch_size):
                inputs = proc(images=list(rgb[a : a + ctx.batch_size]), return_tensors="pt")
                hidden = model(pixel_values=inputs["pixel_values"].to(_device(ctx))).last_hidden_state
                out.append(hidden[:, 0].float().cpu().numpy())  # the CLS token
        return np.concatenate(out).astype(np.float32)

    return extract


# ---------------------------------------------------------------------------------------------- Inception (FID)

INCEPTION_FILES = ("inception.safetensors", "pt_inception-2015-12-05-6726825d.pth")


def build_inception(state_dict: dict | None):
    """torch-fidelity's FID Inception-v3 with the given weights (None: random initialisation, for stand-ins).

    torch-fidelity's constructor fetches its weights itself (from the network, or by unpickling a local file);
    we hand it weights already loaded safely instead.
    """
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    cls = fe.FeatureExtractorInceptionV3
    orig_fetch, orig_load = fe.load_state_dict_from_url, cls.load_state_dict
    fe.load_state_dict_from_url = lambda *a, **k: state_dict
    if state_dict is None:
        cls.load_state_dict = lambda self, *a, **k: None
    try:
        return cls("inception-v3-compat", ["2048"])
    finally:
        fe.load_state_dict_from_url, cls.load_state_dict = orig_fetch, orig_load


def _load_state(path: Path) -> dict:
    import warnings

    try:
        with warnings.catch_warnings():  # torch explains a refused pickle at length; the one line below says it
            warnings.simplefilter("ignore")
            return _read_state(path)
    except Exception as e:  # a damaged file, or one that is not a plain state dict
        raise UserError(f"{path}: not a loadable weights file ({short_error(e)})") from None


def _read_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _inception_file(feature_dir: str | None) -> Path:
    dirs = [Path(feature_dir)] if feature_dir else []
    dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    for d in dirs:
        for f in INCEPTION_FILES:
            if (d / f).is_file():
                return d / f
    raise UserError(f"inception: FID Inception-v3 weights not found (looked for {' or '.join(INCEPTION_FILES)} in "
                    f"{'; '.join(str(d) for d in dirs)}); put the file there or pass its folder with feature_dir / "
                    f"--feature-dir")


def load_inception(ctx: SpaceContext):
    path = _inception_file(ctx.feature_dir)
    state = _load_state(path)
    try:
        return build_inception(state)
    except Exception as e:  # a state dict of another network: missing or unexpected keys, other shapes
        raise UserError(f"{path}: not the FID Inception-v3's weights ({short_error(e)})") from None


def check_weights(spaces, feature_dir: str | None, load: bool = False) -> None:
    """Refuse, before any work, a feature_dir that is not a folder and a space whose weights cannot be found;
    with `load`, also weights that do not load (a run checks this before its run directory exists)."""
    if feature_dir is not None and not Path(feature_dir).is_dir():
        raise UserError(f"feature_dir {feature_dir}: not a folder")
    for name in dict.fromkeys(spaces):
        check_space(name)
        if name in DINOV2 and load:
            load_dinov2(name, SpaceContext(feature_dir=feature_dir))
        elif name in DINOV2:
            _dinov2_source(name, feature_dir)
        elif name == "inception" and load:
            load_inception(SpaceContext(feature_dir=feature_dir))
        elif name == "inception":
            _inception_file(feature_dir)


def _inception(images: np.ndarray, ctx: SpaceContext) -> np.ndarray:
    key = ("inception", ctx.feature_dir)
    if key not in _CACHE:
        _CACHE[key] = load_inception(ctx).to(_device(ctx))
    model = _CACHE[key]
    rgb = np.repeat(images, 3, axis=3) if images.shape[3] == 1 else images
    out = []
    with torch.no_grad():
        for a in _batches(ctx, "inception", len(rgb), ctx.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(rgb[a : a + ctx.batch_size])).permute(0, 3, 1, 2)
            out.append(model(x.to(_device(ctx)))[0].double().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


SPACES: dict[str, Callable[[np.ndarray, SpaceContext], np.ndarray]] = {
    "pixel": lambda images, ctx: pixel_vectors(images),
    "domain": _domain,
    "inception": _inception,
    **{name: _dinov2(name) for name in DINOV2},
}


assert tuple(SPACES) == registry.SPACES, "features.SPACES and registry.SPACES must name the same spaces"


def check_space(name: str) -> None:
    check_name("space", name, registry.SPACES)


def extract(name: str, images: np.ndarray, ctx: SpaceContext | None = None) -> np.ndarray:
    """Feature vectors of images in the named space."""
    check_space(name)
    return SPACES[name](images, ctx or SpaceContext())


def selection_vectors(name: str, images: np.ndarray, method: str, ctx: SpaceContext | None = None) -> np.ndarray:
    """What a selector sees of images in the named space. Pixel-space greedy sees the uint8 pixels themselves: its
    choices do not depend on scale, and 0-255 distances are exact in float64, so equal distances are exact ties
    (scaled to [0, 1] in float32, values round and equal distances can differ in the last bit, so the tie rule,
    lowest index first, broke). Every other method sees `extract`'s vectors (threshold's tau is in their units)."""
    if name == "pixel" and method == "greedy":
        check_space(name)
        return images.reshape(len(images), -1)
    return extract(name, images, ctx)
