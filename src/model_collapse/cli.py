"""Command line: parse and validate into a config or arguments, call one library function, print results.

Results go to stdout (`--json`: one JSON object), progress to stderr. Bad input ends with one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

from model_collapse.errors import UserError

PROG = "model-collapse"
PROGRESS_DELAY = 2.0  # seconds a stage runs before its progress bar appears


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UserError(message)


def _seed(text: str) -> int:
    """A seed option: an integer in [0, 2^63), as a run's config requires."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed must lie in [0, 2^63), got {value}")
    return value


def _image_set_options(p: argparse.ArgumentParser, precision: bool = False) -> None:
    """What every command on image sets takes: the feature space, where weights are, output and progress."""
    p.add_argument("--space", default="pixel")
    p.add_argument("--feature-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    if precision:
        p.add_argument("--precision", choices=("float32", "float64"), default="float32",
                       help="working precision of the kNN products (answers are exact either way)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Study and prevent model collapse in self-consuming diffusion loops.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="run or resume a self-consuming loop study")
    r.add_argument("config", nargs="?", default=None, help="a .toml config file or a preset name (default: demo)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable); arms.<index or name>.<key>=VALUE changes one arm")
    r.add_argument("--out", default=None, help="run directory (default: runs/<preset or config name>)")
    r.add_argument("--only", default=None, metavar="SEED[/ARM] | @I",
                   help="run one slice of the study into the shared RUN_DIR: a seed, a seed and an arm (label or "
                        "index), or @I, the I-th (seed, arm) slice (for a scheduler's job array); the summary and "
                        "report merge whatever slices are complete")
    r.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    r.add_argument("--json", action="store_true", help="print one JSON summary on stdout")
    r.add_argument("--quiet", action="store_true", help="no progress on stderr")

    s = sub.add_parser("select", help="select N images (or feature vectors) from a pool (greedy, threshold, gated, "
                                      "herding, capped, random)")
    s.add_argument("pool", help=f"images, or a feature array: {FEATURES_HELP}")
    s.add_argument("--n", type=int, required=True)
    s.add_argument("--method", default="greedy")
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--tau0", type=float, default=None, help="threshold: first radius (default: from the pool)")
    s.add_argument("--decay", type=float, default=0.95, help="threshold: radius factor per pass")
    s.add_argument("--decay-when", choices=("every_pass", "empty_pass"), default="every_pass",
                   help="threshold: decay after every pass (the authors' code) or only after a pass that accepted "
                        "nothing (the paper's Algorithm 2); both choose the same images")
    s.add_argument("--reference", default=None,
                   help="gated, herding, capped: images (or a data set) of what good data look like, in the same --space")
    s.add_argument("--per-class", action="store_true", help="select within classes, keeping their shares")
    s.add_argument("--out", default=None, help="output .npz (images, labels, indices, method, seed, ...); needed for "
                                               "images, optional for a feature array (the indices go to stdout)")
    _image_set_options(s)

    e = sub.add_parser("entropy", help="Kozachenko-Leonenko kNN entropy of an image set or a feature array")
    e.add_argument("data", help=f"images, or {FEATURES_HELP}")
    e.add_argument("--k", type=int, default=1)
    _image_set_options(e, precision=True)

    c = sub.add_parser("score", help="generalization score and memorization of generated images")
    c.add_argument("generated")
    c.add_argument("--train", required=True)
    _image_set_options(c, precision=True)

    f = sub.add_parser("fid", help="Frechet distance (FID in the inception space), KID, precision/recall")
    f.add_argument("generated")
    f.add_argument("--ref", required=True)
    f.add_argument("--seed", type=_seed, default=0, help="seed of the size-matched reference subset and KID subsets")
    _image_set_options(f)

    rp = sub.add_parser("report", help="an HTML report of one or more run directories")
    rp.add_argument("run_dirs", nargs="+")
    rp.add_argument("--out", default=None, help="output .html (default: RUN_DIR/report.html)")

    pr = sub.add_parser("probe", help="memorization transition of single models: training-set size x steps")
    pr.add_argument("data", nargs="?", default="digits")
    pr.add_argument("--sizes", default=None, help="comma-separated training-set sizes")
    pr.add_argument("--steps", default=None, help="comma-separated training steps to evaluate at")
    pr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--out", default="runs/probe")
    pr.add_argument("--json", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    return p


FEATURES_HELP = ("a .npy of shape (N, D) floats (read memory-mapped) or an .npz with `features` (and `labels`), "
                 "used as given instead of --space")


def _load_any(spec: str):
    """A FeatureSet for a feature array, else an ImageSet."""
    from model_collapse.data import load_images

    return load_images(spec, features=True)


def _is_features(x) -> bool:
    from model_collapse.data import FeatureSet

    return isinstance(x, FeatureSet)


def _match(a, b, what_a: str, what_b: str) -> None:
    """Two inputs compared with each other: both feature arrays of one D, or both images of one shape."""
    if _is_features(a) != _is_features(b):
        kinds = {True: "a feature array", False: "images"}
        raise UserError(f"the {what_a} set is {kinds[_is_features(a)]} but the {what_b} set is "
                        f"{kinds[_is_features(b)]}; give two of one kind")
    if _is_features(a) and a.dim != b.dim:
        raise UserError(f"the {what_a} features have D = {a.dim} but the {what_b} features have D = {b.dim}")
    if not _is_features(a) and a.shape != b.shape:
        raise UserError(f"{what_a} images are {a.shape} (H, W, C) but {what_b} images are {b.shape}")


def _vectors(args, data, ctx):
    """A feature array as given, or images' features in --space."""
    from model_collapse.features import extract

    return data.vectors if _is_features(data) else extract(args.space, data.images, ctx)


def _finite_or_none(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite_or_none(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite_or_none(x) for x in v]
    return v


def _emit(obj: dict, as_json: bool, text: str) -> None:
    if as_json:  # strict JSON: an infinite or undefined value (a collapsed set's entropy) is null
        print(json.dumps(_finite_or_none(obj), allow_nan=False))
    else:
        print(text)


def _load(spec: str):
    from model_collapse.data import load_images

    return load_images(spec)


def _bars(args):
    from model_collapse.progress import Bars

    return Bars(show=not args.quiet, delay=PROGRESS_DELAY)


def _ctx(args, real=None, progress=None):
    """Feature context; `real` is the image set a learned space (domain) is trained on."""
    from model_collapse.features import SpaceContext, check_weights

    if real is not None:  # images to extract features of (a feature array is used as given)
        check_weights([args.space], args.feature_dir)
    return SpaceContext(feature_dir=args.feature_dir, real_images=None if real is None else real.images,
                        real_labels=None if real is None else real.labels, progress=progress)


def cmd_run(args) -> int:
    from model_collapse.config import config_to_dict, parse_slice, resolve_config

    cfg = resolve_config(args.config, args.overrides)
    only = parse_slice(cfg, args.only) if args.only is not None else None
    if args.dry_run:
        from model_collapse.study import prepare

        prepare(cfg)  # the data, model and weights checks a run makes before writing anything
        print(json.dumps(config_to_dict(cfg), indent=2))
        return 0
    from model_collapse.loop import run_loop
    from model_collapse.summary import format_summary

    name = Path(args.config).stem if args.config else "demo"
    out = args.out or os.path.join("runs", name)
    summary = run_loop(cfg, out, show=not args.quiet, only=only)
    _emit(summary, args.json, format_summary(summary))
    return 0


def cmd_select(args) -> int:
    import numpy as np

    from model_collapse.features import check_space, selection_vectors
    from model_collapse.rundir import atomic_save_npz
    from model_collapse.selection import NEEDS_REFERENCE, check_method, select

    check_method(args.method)
    check_space(args.space)
    if args.out is not None:
        if not args.out.endswith(".npz"):
            raise UserError(f"--out {args.out}: the selection is written as .npz; give a name ending in .npz")
        check_output_file(args.out)
    if args.n <= 0:
        raise UserError(f"--n must be > 0, got {args.n}")
    if not 0 < args.decay < 1:
        raise UserError(f"--decay must lie in (0, 1), got {args.decay}")
    if args.tau0 is not None and not 0 < args.tau0 < float("inf"):
        raise UserError(f"--tau0 must be a finite number > 0, got {args.tau0}")
    pool = _load_any(args.pool)
    features = _is_features(pool)
    if args.out is None and not features:
        raise UserError("--out is needed for an image pool (the selected images are written as .npz)")
    if len(pool) < args.n:
        raise UserError(f"{args.pool}: the pool has {len(pool)} {'rows' if features else 'images'}, fewer than --n "
                        f"{args.n}")
    if args.per_class and pool.labels is None:
        raise UserError(f"{args.pool}: --per-class needs labels in the pool (.npz with 'labels' or class folders)")
    reference = _load_any(args.reference) if args.reference is not None else None
    if reference is not None:
        _match(reference, pool, "--reference", "pool")
    if args.method in NEEDS_REFERENCE and reference is None:
        raise UserError(f"--method {args.method} needs --reference (what good data look like)")
    bars = _bars(args)
    ctx = _ctx(args, None if features else pool, bars)
    feats = pool.vectors if features else selection_vectors(args.space, pool.images, args.method, ctx)
    sel = select(feats, args.n, args.method, args.seed, labels=pool.labels, per_class=args.per_class,
                 tau0=args.tau0, decay=args.decay, decay_when=args.decay_when, progress=bars,
                 reference=None if reference is None else _vectors(args, reference, ctx),
                 reference_labels=None if reference is None else reference.labels)
    space = "given" if features else args.space
    extra = {k: v for k, v in sel.params.items() if isinstance(v, (int, float, np.generic))}
    if args.out is not None:
        atomic_save_npz(Path(args.out), images=None if features else pool.images[sel.indices],
                        labels=pool.labels[sel.indices] if pool.labels is not None else None,
                        indices=sel.indices, method=sel.method, seed=sel.seed, space=space,
                        order=sel.params.get("order"), **extra)
    result = {"out": args.out, "n": int(len(sel.indices)), "method": sel.method, "seed": sel.seed,
              "space": space, **{k: (float(v) if isinstance(v, float) else v) for k, v in extra.items()}}
    if args.out is None:
        result["indices"] = [int(i) for i in sel.indices]
    _emit(result, args.json, "\n".join(f"{k}: {v}" for k, v in result.items()))
    return 0


def cmd_entropy(args) -> int:
    from model_collapse.features import check_space
    from model_collapse.metrics import kl_entropy

    check_space(args.space)
    if args.k < 1:
        raise UserError(f"--k must be >= 1, got {args.k}")
    data = _load_any(args.data)
    if args.k >= len(data):
        raise UserError(f"--k must be smaller than the number of images ({len(data)}), got {args.k}")
    bars = _bars(args)
    feats = _vectors(args, data, _ctx(args, None if _is_features(data) else data, bars))
    try:
        res = kl_entropy(feats, args.k, progress=bars, precision=args.precision)
    except ValueError as e:
        raise UserError(f"{args.data}: {e}") from None
    out = {**res.as_dict(), "n_images": len(data), "space": "given" if _is_features(data) else args.space}
    _emit(out, args.json, "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cmd_score(args) -> int:
    from model_collapse.features import check_space
    from model_collapse.measure import memorization
    from model_collapse.metrics import distinct_index

    check_space(args.space)
    gen, train = _load_any(args.generated), _load_any(args.train)
    _match(gen, train, "generated", "training")
    bars = _bars(args)
    def refuse_collapsed(vectors):  # the score's scale is the training set's spacing
        distinct = len(distinct_index(vectors))
        if distinct < 2:
            raise UserError(f"--train {args.train}: the score needs at least 2 distinct training images (its scale "
                            f"is their nearest-neighbour spacing), got {distinct}")

    if not _is_features(train):  # images that are copies stay copies in every space (up to float noise)
        refuse_collapsed(train.images.reshape(len(train), -1))
    ctx = _ctx(args, None if _is_features(train) else train, bars)
    train_vectors = _vectors(args, train, ctx)
    refuse_collapsed(train_vectors)
    try:
        _, res = memorization(train_vectors, _vectors(args, gen, ctx), progress=bars, precision=args.precision)
    except ValueError as e:
        raise UserError(str(e)) from None
    out = {**res.as_dict(), "space": "given" if _is_features(gen) else args.space}
    _emit(out, args.json, "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cmd_fid(args) -> int:
    from model_collapse.features import check_space
    from model_collapse.measure import make_reference, quality

    check_space(args.space)
    gen, ref = _load_any(args.generated), _load_any(args.ref)
    _match(gen, ref, "generated", "reference")
    if len(gen) < 2 or len(ref) < 2:
        raise UserError("the Frechet distance needs at least 2 images in each set")
    ctx = _ctx(args, None if _is_features(ref) else ref, _bars(args))
    fg, fr = _vectors(args, gen, ctx), _vectors(args, ref, ctx)
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            measured = quality(fg, make_reference(fr, len(fg), args.seed), args.seed)
        except np.linalg.LinAlgError as e:  # covariances of values near the float range
            raise UserError(f"the Frechet distance cannot be computed on these vectors ({e})") from None
    for w in caught:  # a result's warnings are still shown; a refusal's are one line
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    out = {"space": "given" if _is_features(gen) else args.space, **measured, "n_generated": len(gen),
           "n_ref": len(ref)}
    _emit(out, args.json, "\n".join(f"{k}: {v}" for k, v in out.items()))
    return 0


def cmd_report(args) -> int:
    from model_collapse.report import write_report

    dirs = [Path(d) for d in args.run_dirs]
    for d in dirs:
        if not (d / "config.json").exists() and not (d / "probe_config.json").exists():
            raise UserError(f"{d}: not a run or probe directory (no config.json or probe_config.json)")
    # one run: its own report.html; several: a comparison beside the first run, never over a run's own report
    default = dirs[0] / "report.html" if len(dirs) == 1 else \
        dirs[0].parent / ("compare-" + "-".join(d.resolve().name for d in dirs) + ".html")
    out = Path(args.out) if args.out else default  # figures: see report.figures_dir
    check_output_file(out)
    path = write_report(dirs, out, show=True)
    print(str(path))
    return 0


def cmd_probe(args) -> int:
    from model_collapse.probe import format_probe, resolve_probe, run_probe

    pcfg = resolve_probe(args.data, args.sizes, args.steps, args.overrides)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"--out {args.out}: exists and is not a directory (a probe writes a directory)")
    res = run_probe(pcfg, args.out, show=not args.quiet)
    _emit(res, args.json, format_probe(res))
    return 0


def check_output_file(out) -> None:
    """An output file's place, checked before any work: its folder exists, and it is not itself a folder."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give a file name")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out}: exists and is not a regular file (a device, a FIFO); give a file name")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist")


COMMANDS = {"run": cmd_run, "select": cmd_select, "entropy": cmd_entropy, "score": cmd_score, "fid": cmd_fid,
            "report": cmd_report, "probe": cmd_probe}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    import warnings  # memory-mapped inputs are read-only, and only read: torch's warning about them is noise

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    try:
        args = _parser().parse_args(argv)
        if args.command is None:  # `model-collapse` alone: show help
            _parser().print_help()
            return 0
        if getattr(args, "out", None) == "":
            raise UserError("--out: an empty path")
        return COMMANDS[args.command](args)
    except UserError as e:
        msg = " ".join(str(e).split())
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system refused a path we were given: too long, not permitted, a full disk
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{PROG}: error: {where[:200]}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
