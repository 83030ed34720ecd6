"""The visual report: one self-contained HTML file (figures embedded, no JavaScript) plus each figure as a PNG.

Works on finished, running or interrupted runs (it shows what exists) and on several run directories at once
(arms labelled run/arm). Each arm keeps one colour in every figure.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_collapse.rundir import atomic_write_bytes, load_npz, read_json, read_metrics

CURVES = [
    ("train_entropy_pixel", "training-set entropy (nats)"),
    ("gen_score_pixel", "generalization score (pixel L2)"),
    ("gen_score_ratio_pixel", "gen. score / training spacing"),
    ("train_spacing_pixel", "training-set NN spacing (pixel L2)"),
    ("mem_fraction_pixel", "memorized share (d1/d2 < 1/3)"),
    ("copy_fraction_pixel", "copy share (d1 < spacing/3)"),
    ("variance_pixel", "variance of samples (trace)"),
    ("precision_pixel", "precision (samples on the real manifold)"),
    ("recall_pixel", "recall (real data on the samples' manifold)"),
    ("train_duplicates", "exact duplicates in training set"),
]
VERDICT_MARKERS = {"stable": "o", "contracting": "v", "copying": "X"}


@dataclass
class Arm:
    label: str
    run: Path
    name: str  # arm name inside its run
    rows: list[dict] = field(default_factory=list)

    def iter_dir(self, t: int) -> Path:
        """Where the arm's samples and measurements of iteration t are (see RunDir.sample_dir)."""
        own = self.run / "arms" / self.name / f"iter_{t:03d}"
        return own if (t > 0 or own.exists()) else self.run / "iter_000"

    def train_dir(self, t: int) -> Path:
        return self.run / "iter_000" if t == 0 else self.iter_dir(t)


def _load_arms(run_dirs: list[Path]) -> tuple[list[Arm], dict]:
    arms, configs = [], {}
    names = [Path(d).resolve().name for d in run_dirs]
    for d, nm in zip(run_dirs, names):
        d = Path(d)
        if names.count(nm) > 1:
            nm = f"{nm}#{run_dirs.index(d)}"
        cfg = read_json(d / "config.json")
        configs[nm] = cfg
        rows = read_metrics(d / "metrics.jsonl")
        from model_collapse.config import config_from_dict

        labels = [a.label() for a in config_from_dict(cfg).arms]
        for lab in labels:
            label = lab if len(run_dirs) == 1 else f"{nm}/{lab}"
            arms.append(Arm(label, d, lab, sorted((r for r in rows if r["arm"] == lab), key=lambda r: r["iteration"])))
    return arms, configs


def _colours(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------- figures


def fig_curves(arms: list[Arm], colours) -> bytes:
    import matplotlib.pyplot as plt

    keys = list(CURVES)
    fd = sorted({k for a in arms for r in a.rows for k in r if k.startswith("fd_")})
    keys += [(k, f"Frechet distance, {k[3:]} space") for k in fd]
    kid = sorted({k for a in arms for r in a.rows for k in r if k.startswith("kid_") and not k.startswith("kid_std_")})
    keys += [(k, f"KID (unbiased), {k[4:]} space") for k in kid]
    extra = sorted({k for a in arms for r in a.rows for k in r
                    if k.startswith(("train_entropy_", "gen_score_")) and not k.endswith("_pixel")
                    and not k.startswith("gen_score_ratio_")})
    keys += [(k, k.replace("_", " ")) for k in extra]
    ncol = 3
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys):
        for a, c in zip(arms, colours):
            pts = [(r["iteration"], r.get(key), r.get("verdict", "stable")) for r in a.rows if _finite(r.get(key))]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=c, label=a.label, lw=1.6)
            for v, mk in VERDICT_MARKERS.items():
                sel = [p for p in pts if p[2] == v]
                if sel:
                    ax.scatter([p[0] for p in sel], [p[1] for p in sel], marker=mk, color=c, s=36, zorder=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], marker=m, color="grey", ls="", label=f"verdict: {v}") for v, m in VERDICT_MARKERS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)), bbox_to_anchor=(0.5, 1.02 + 0.01 * nrow))
    fig.tight_layout()
    return _png(fig)


def entropy_generalization(arms: list[Arm], space: str = "pixel") -> dict:
    """Training-set entropy against log generalization score over all (arm, iteration) points: least-squares line
    and Pearson r (the paper's headline relation, r = 0.91 there)."""
    seen, xs, ys, who = set(), [], [], []
    for a in arms:
        for r in a.rows:
            e, g = r.get(f"train_entropy_{space}"), r.get(f"gen_score_{space}")
            if not (_finite(e) and _finite(g) and g > 0):
                continue
            key = str(a.iter_dir(r["iteration"]))
            if key in seen:  # iteration 0 is shared by the arms of one run: one point
                continue
            seen.add(key)
            xs.append(e), ys.append(math.log(g)), who.append(a.label)
    out = {"n": len(xs), "x": xs, "y": ys, "arm": who, "pearson_r": None, "slope": None, "intercept": None}
    if len(xs) >= 3 and np.std(xs) > 0 and np.std(ys) > 0:
        out["pearson_r"] = float(np.corrcoef(xs, ys)[0, 1])
        out["slope"], out["intercept"] = (float(v) for v in np.polyfit(xs, ys, 1))
    return out


def fig_correlation(arms: list[Arm], colours, corr: dict, space: str = "pixel") -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = {a.label: c for a, c in zip(arms, colours)}
    for lab in dict.fromkeys(corr["arm"]):
        sel = [i for i, w in enumerate(corr["arm"]) if w == lab]
        ax.scatter([corr["x"][i] for i in sel], [corr["y"][i] for i in sel], color=cmap[lab], label=lab, s=40)
    if corr["pearson_r"] is not None:
        xs = np.linspace(min(corr["x"]), max(corr["x"]), 50)
        ax.plot(xs, corr["slope"] * xs + corr["intercept"], "k--", lw=1)
        ax.plot([], [], "k--", lw=1, label=f"least squares, Pearson r = {corr['pearson_r']:.3f} (n = {corr['n']})")
    ax.set_xlabel(f"training-set entropy (nats, {space} space)")
    ax.set_ylabel(f"log generalization score (log L2 in {space} space)")
    ax.set_title(f"Training-set entropy against generalization, {space} space")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")  # placed where it hides the fewest points
    fig.tight_layout()
    return _png(fig)


def _show(ax, img):
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])


def fig_samples(arm: Arm, n_show: int = 12) -> bytes | None:
    """Sample grid: one row per iteration, the same sample indices 0..n_show-1 in every row."""
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in arm.rows if (arm.iter_dir(r["iteration"]) / "samples.npz").exists()]
    if not its:
        return None
    fig, axes = plt.subplots(len(its), n_show, figsize=(0.8 * n_show, 0.85 * len(its) + 0.5), squeeze=False)
    for row, t in zip(axes, its):
        imgs = load_npz(arm.iter_dir(t) / "samples.npz")["images"]
        for i, ax in enumerate(row):
            if i < len(imgs):
                _show(ax, imgs[i])
            else:
                ax.axis("off")
        row[0].set_ylabel(f"it {t}", rotation=0, ha="right", va="center")
    fig.suptitle(f"{arm.label}: samples 0..{n_show - 1} at every iteration")
    fig.tight_layout()
    return _png(fig)


def nearest_pairs(arm: Arm, t: int, n_pairs: int = 8):
    """The generated samples closest to a training image, with that image and the distance."""
    from model_collapse.data import pixel_vectors
    from model_collapse.metrics import distinct_index

    d = arm.iter_dir(t)
    if not all((d / f).exists() for f in ("neighbours_pixel.npz", "samples.npz")) or \
            not (arm.train_dir(t) / "train.npz").exists():
        return None
    nb = load_npz(d / "neighbours_pixel.npz")
    gen = load_npz(d / "samples.npz")["images"]
    train = load_npz(arm.train_dir(t) / "train.npz")["images"]
    keep = distinct_index(pixel_vectors(train))
    order = np.argsort(nb["d1"], kind="stable")[:n_pairs]
    return [(gen[i], train[keep[nb["nearest"][i]]], float(nb["d1"][i]), float(nb["d2"][i])) for i in order]


def fig_pairs(arm: Arm) -> bytes | None:
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in arm.rows]
    its = sorted({its[0], its[-1]}) if its else []
    data = [(t, nearest_pairs(arm, t)) for t in its]
    data = [(t, p) for t, p in data if p]
    if not data:
        return None
    n = max(len(p) for _, p in data)
    fig, axes = plt.subplots(2 * len(data), n, figsize=(1.05 * n, 2.5 * len(data) + 0.4), squeeze=False)
    for k, (t, pairs) in enumerate(data):
        for j in range(n):
            top, bottom = axes[2 * k, j], axes[2 * k + 1, j]
            if j >= len(pairs):
                top.axis("off"), bottom.axis("off")
                continue
            g, tr, d1, d2 = pairs[j]
            _show(top, g), _show(bottom, tr)
            top.set_title(f"d={d1:.2f}\nd1/d2={d1 / d2 if d2 else 1:.2f}", fontsize=7)
        axes[2 * k, 0].set_ylabel(f"it {t}\ngenerated", fontsize=8)
        axes[2 * k + 1, 0].set_ylabel("nearest\ntraining", fontsize=8)
    fig.suptitle(f"{arm.label}: closest generated samples (top) and the training image each is nearest to (bottom)",
                 fontsize=9)
    fig.tight_layout()
    return _png(fig)


def fig_projection(arms: list[Arm], colours, real: np.ndarray | None, generated_of, what: str) -> bytes | None:
    """Real and generated vectors on the real data's top two principal directions, with density contours.

    real: (n, d) real vectors; generated_of(arm, t): that iteration's generated vectors, or None."""
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    if real is None or len(real) < 3:
        return None
    rv = np.asarray(real, np.float64)
    mu = rv.mean(0)
    _, _, vt = np.linalg.svd(rv - mu, full_matrices=False)
    P = vt[:2].T
    rp = (rv - mu) @ P
    its = sorted({r["iteration"] for a in arms for r in a.rows})
    if not its or P.shape[1] < 2:
        return None
    fig, axes = plt.subplots(len(arms), len(its), figsize=(2.6 * len(its), 2.5 * len(arms)), squeeze=False,
                             sharex=True, sharey=True)
    lim = np.percentile(np.abs(rp), 99.5) * 1.3
    for row, a, c in zip(axes, arms, colours):
        for ax, t in zip(row, its):
            ax.scatter(rp[:600, 0], rp[:600, 1], s=2, color="0.75")
            gv = generated_of(a, t) if any(r["iteration"] == t for r in a.rows) else None
            if gv is not None:
                g = (np.asarray(gv, np.float64) - mu) @ P
                ax.scatter(g[:, 0], g[:, 1], s=3, color=c)
                try:
                    kde = gaussian_kde(g.T)
                    xx, yy = np.meshgrid(np.linspace(-lim, lim, 60), np.linspace(-lim, lim, 60))
                    zz = kde(np.vstack([xx.ravel(), yy.ravel()])).reshape(xx.shape)
                    ax.contour(xx, yy, zz, levels=5, colors=[c], linewidths=0.8)
                except (np.linalg.LinAlgError, ValueError):
                    pass
            ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
            if a is arms[0]:
                ax.set_title(f"iteration {t}", fontsize=9)
        row[0].set_ylabel(a.label, fontsize=8)
    fig.suptitle(f"generated (colour) vs real (grey) on the real data's top 2 principal directions ({what})",
                 fontsize=9)
    fig.tight_layout()
    return _png(fig)


def _pixel_samples(a: Arm, t: int) -> np.ndarray | None:
    from model_collapse.data import pixel_vectors

    f = a.iter_dir(t) / "samples.npz"
    return pixel_vectors(load_npz(f)["images"]) if f.exists() else None


def _space_samples(space: str):
    """The generated features an iteration cached while it was measured (its first n_eval samples)."""
    def get(a: Arm, t: int) -> np.ndarray | None:
        f = a.iter_dir(t) / f"features_{space}.npz"
        return load_npz(f)["generated"] if f.exists() else None

    return get


# ---------------------------------------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.verdict-copying{color:#b00;font-weight:bold}.verdict-contracting{color:#a60}
pre{background:#f7f7f7;padding:8px;font-size:11px;overflow:auto}.note{color:#555;font-size:13px}"""

TABLE_KEYS = ["iteration", "n_train", "train_entropy_pixel", "train_duplicates", "train_spacing_pixel",
              "gen_score_pixel", "gen_score_ratio_pixel", "mem_fraction_pixel", "copy_fraction_pixel",
              "variance_pixel", "fd_pixel", "train_real_fraction", "verdict"]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return html.escape(",".join(str(x) for x in v))
    return html.escape(str(v))


def _table(arm: Arm) -> str:
    keys = TABLE_KEYS + sorted({k for r in arm.rows for k in r} - set(TABLE_KEYS)
                               - {"arm", "verdict_evidence", "paradigm", "selector", "pool_factor", "n_generated"})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for r in arm.rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cls = f' class="verdict-{v}"' if k == "verdict" else ""
            title = f' title="{html.escape(json.dumps(r.get("verdict_evidence", {})))}"' if k == "verdict" else ""
            cells.append(f"<td{cls}{title}>{_cell(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def write_report(run_dirs: list[Path], out: Path, show: bool = False) -> Path:
    """Write the HTML report of one or more run directories to `out`, and every figure as a PNG under the first
    run directory's figures/ folder."""
    import matplotlib

    matplotlib.use("Agg")
    from model_collapse.data import load_images

    dirs = [Path(d) for d in run_dirs]
    probes = [d for d in dirs if (d / "probe_config.json").exists() and not (d / "config.json").exists()]
    run_dirs = [d for d in dirs if d not in probes]
    arms, configs = _load_arms(run_dirs)
    colours = _colours(len(arms))
    figdir = (run_dirs or probes)[0] / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, bytes]] = []  # (section, file name, png)

    def add(section, name, png):
        if png is not None:
            atomic_write_bytes(figdir / name, png)
            figures.append((section, name, png))

    add("Metrics over iterations", "curves.png", fig_curves(arms, colours))
    corr = entropy_generalization(arms)
    add("Entropy vs generalization", "entropy_vs_generalization.png", fig_correlation(arms, colours, corr))
    space_corr = {}  # the same relation in every other measured space
    for space in sorted({k[len("train_entropy_"):] for a in arms for r in a.rows for k in r
                         if k.startswith("train_entropy_")} - {"pixel"}):
        c = entropy_generalization(arms, space)
        if c["n"]:
            space_corr[space] = c
            add("Entropy vs generalization", f"entropy_vs_generalization_{space}.png",
                fig_correlation(arms, colours, c, space))
    for i, a in enumerate(arms):
        add("Sample grids", f"samples_{i:02d}.png", fig_samples(a))
    for i, a in enumerate(arms):
        add("Nearest-neighbour pairs", f"pairs_{i:02d}.png", fig_pairs(a))
    real = None
    try:
        if not configs:
            raise ValueError("no run directory")
        first_cfg = next(iter(configs.values()))
        real = load_images(first_cfg["data"], first_cfg.get("data_root"), False, first_cfg.get("image_size")).images
    except Exception as e:  # the report still shows everything else
        print(f"report: no projection figure ({e})", file=sys.stderr)
    if real is not None:
        from model_collapse.data import pixel_vectors

        add("2-D projection", "projection.png", fig_projection(arms, colours, pixel_vectors(real), _pixel_samples,
                                                                 "pixel space"))
    for space in (next(iter(configs.values())).get("spaces", []) if configs else []):
        ref = run_dirs[0] / "features" / f"real_reference_{space}.npz"
        if space != "pixel" and ref.exists():  # written by the run when it measured that space
            add("2-D projection", f"projection_{space}.png",
                fig_projection(arms, colours, load_npz(ref)["features"], _space_samples(space), f"{space} space"))
    for i, p in enumerate(probes):
        from model_collapse.probe import read_probe

        add("Memorization transition (probe)", f"probe_{i:02d}.png", probe_figure(read_probe(p)))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>model-collapse report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>model-collapse report: {html.escape(', '.join(str(d) for d in dirs))}</h1>"]
    status = []
    for a in arms:
        its = [r["iteration"] for r in a.rows]
        status.append(f"{html.escape(a.label)}: iterations {its[0]}..{its[-1]}" if its else
                      f"{html.escape(a.label)}: no iteration finished yet")
    parts.append(f"<p class='note'>{'; '.join(status)}. Verdict markers on the curves: circle stable, triangle "
                 f"contracting, cross copying.</p>")
    if corr["pearson_r"] is not None:
        parts.append(f"<p>Entropy vs log generalization score: Pearson r = <b>{corr['pearson_r']:.3f}</b> over "
                     f"{corr['n']} (arm, iteration) points (the paper reports 0.91).</p>")
    for space, c in space_corr.items():
        if c["pearson_r"] is not None:
            parts.append(f"<p>In {html.escape(space)} space: Pearson r = <b>{c['pearson_r']:.3f}</b> over {c['n']} "
                         f"points.</p>")
    section = None
    for sec, name, png in figures:
        if sec != section:
            parts.append(f"<h2>{html.escape(sec)}</h2>")
            section = sec
        b64 = base64.b64encode(png).decode()
        parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>")
    parts.append("<h2>Metrics</h2>")
    for a in arms:
        parts.append(f"<h3>{html.escape(a.label)}</h3>{_table(a)}")
    parts.append("<h2>Config</h2>")
    for nm, cfg in configs.items():
        parts.append(f"<h3>{html.escape(nm)}</h3><pre>{html.escape(json.dumps(cfg, indent=2))}</pre>")
    parts.append("</body></html>")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "\n".join(parts).encode())
    if show:
        print(f"report: {out}", file=sys.stderr)
    return out


def probe_figure(rows: list[dict]) -> bytes | None:
    """Memorization (ratio test, copy test) and normalised score against training steps, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    sizes = sorted({r["size"] for r in rows})
    colours = _colours(len(sizes))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for size, c in zip(sizes, colours):
        rs = [r for r in rows if r["size"] == size]
        st = [r["steps"] for r in rs]
        axes[0].plot(st, [r["mem_fraction"] for r in rs], "o-", color=c, label=f"N = {size}")
        axes[1].plot(st, [r["copy_fraction"] for r in rs], "o-", color=c, label=f"N = {size}")
        axes[2].plot(st, [r["gen_score_ratio"] for r in rs], "o-", color=c, label=f"N = {size}")
    axes[0].set_title("memorized share (d1/d2 < 1/3)")
    axes[1].set_title("copy share (d1 < training spacing / 3)")
    axes[2].set_title("gen. score / training-set spacing")
    for ax in axes:
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylim(-0.02, 1.02), axes[1].set_ylim(-0.02, 1.02)
    fig.suptitle("memorization transition of single models: training-set size x training steps")
    fig.tight_layout()
    return _png(fig)


def write_probe_figure(rows: list[dict], path: Path) -> None:
    png = probe_figure(rows)
    if png is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(path), png)
