"""The report's figures: pure functions from rows, images and vectors to PNG bytes (matplotlib, Agg).

An `arm` here is anything with `label`, `rows` (metrics rows sorted by iteration) and `iter_dir(t)`; the report
module reads run directories into such arms.
"""

from __future__ import annotations

import io
import math

import numpy as np

from model_collapse.linalg import principal_directions
from model_collapse.stats import number

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
    ("train_real_fraction", "share of real images in the training set"),
    ("train_duplicates", "exact duplicates in training set"),
]
VERDICT_MARKERS = {"stable": "o", "contracting": "v", "copying": "X"}

def palette(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def finite(v) -> bool:
    return number(v) is not None


def fig_curves(arms: list, colours) -> bytes | None:
    """Every metric over iterations, one line per arm: the mean over seeds with its 95% interval as a band
    (`arm.stats`: metric -> one interval dict per iteration); verdict markers where the arm has one seed
    (`arm.verdicts`). The real share of the training set gets the 1/(t+1) line of vanilla accumulate."""
    import matplotlib.pyplot as plt

    keys = list(CURVES)
    names = {k for a in arms for k in a.stats}
    fd = sorted(k for k in names if k.startswith("fd_"))
    keys += [(k, f"Frechet distance, {k[3:]} space") for k in fd]
    kid = sorted(k for k in names if k.startswith("kid_") and not k.startswith("kid_std_"))
    keys += [(k, f"KID (unbiased), {k[4:]} space") for k in kid]
    extra = sorted(k for k in names if k.startswith(("train_entropy_", "gen_score_")) and not k.endswith("_pixel")
                   and not k.startswith("gen_score_ratio_"))
    keys += [(k, k.replace("_", " ")) for k in extra]
    keys = [(k, t) for k, t in keys if k in names]
    if not keys:  # no row yet
        return None
    ncol = 3
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.2 * nrow), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys):
        for a, c in zip(arms, colours):
            pts = [(t, iv) for t, iv in enumerate(a.stats.get(key, [])) if iv["n"] and finite(iv["mean"])]
            if not pts:
                continue
            ax.plot([t for t, _ in pts], [iv["mean"] for _, iv in pts], "-", color=c, label=a.label, lw=1.6)
            band = [(t, iv) for t, iv in pts if iv["ci_low"] is not None]
            if band:
                ax.fill_between([t for t, _ in band], [iv["ci_low"] for _, iv in band],
                                [iv["ci_high"] for _, iv in band], color=c, alpha=0.15, lw=0)
            for v, mk in VERDICT_MARKERS.items():
                sel = [(t, iv) for t, iv in pts if a.verdicts and t < len(a.verdicts) and a.verdicts[t] == v]
                if sel:
                    ax.scatter([t for t, _ in sel], [iv["mean"] for _, iv in sel], marker=mk, color=c, s=36,
                               zorder=3)
        if key == "train_real_fraction":
            its = sorted({t for a in arms for t, iv in enumerate(a.stats.get(key, [])) if iv["n"]})
            if its:
                ax.plot(its, [1 / (t + 1) for t in its], "k:", lw=1, label="1/(t+1): vanilla accumulate")
                ax.legend(fontsize=7, loc="upper right")
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
    return png(fig)


def smoothed(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps, NaN (unrecorded) steps left out."""
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    k = np.concatenate([[0], np.cumsum(ok)])
    lo = np.maximum(np.arange(1, len(y) + 1) - window, 0)
    n = k[1:] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (c[1:] - c[lo]) / np.maximum(n, 1), np.nan)


def fig_losses(arms: list, colours, loss_of, max_panels: int = 6) -> bytes | None:
    """Training loss per step, one panel per iteration (at most `max_panels`, spread over the run), one line per arm
    (a trailing mean over 2% of the steps). `loss_of(arm, t)` gives an iteration's losses or None; an iteration
    whose training set every arm shares (iteration 0) is drawn once, in black."""
    import matplotlib.pyplot as plt

    its = sorted({r["iteration"] for a in arms for r in a.rows})
    if len(its) > max_panels:
        its = [its[round(i * (len(its) - 1) / (max_panels - 1))] for i in range(max_panels)]
    panels = [(t, [(a, c, loss_of(a, t)) for a, c in zip(arms, colours)]) for t in its]
    panels = [(t, [(a, c, y) for a, c, y in lines if y is not None and np.isfinite(y).any()]) for t, lines in panels]
    panels = [(t, lines) for t, lines in panels if lines]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), sharey=True, squeeze=False)
    for ax, (t, lines) in zip(axes[0], panels):
        shared = len({str(a.train_dir(t)) for a, _, _ in lines}) == 1 and len(lines) > 1
        for a, c, y in lines[:1] if shared else lines:
            ax.plot(np.arange(1, len(y) + 1), smoothed(y, max(1, len(y) // 50)), lw=1.2,
                    color="black" if shared else c, label="every arm" if shared else a.label)
        ax.set_title(f"iteration {t}", fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("training loss (MSE on the noise)", fontsize=8)
    handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
    fig.legend(list(handles.values()), list(handles), fontsize=7, loc="upper center", ncol=min(4, len(handles)),
               bbox_to_anchor=(0.5, 1.12))
    return png(fig)


def fig_correlation(arms: list, colours, corr: dict, space: str = "pixel") -> bytes:
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
    if ax.get_legend_handles_labels()[0]:  # no point yet (a run that has just started): no legend
        ax.legend(fontsize=8, loc="best")  # placed where it hides the fewest points
    fig.tight_layout()
    return png(fig)


GAP = 1  # pixels of background between the images of a mosaic (in units of the images' own pixels)


def mosaic(rows: list[list[np.ndarray]], width: int) -> np.ndarray:
    """Images (h, w, c uint8, all one shape) as one RGB array: `width` cells per row with GAP-pixel white gaps;
    a row shorter than `width` leaves its last cells white. One image for matplotlib to draw instead of an axes
    per sample (a report of a few hundred axes spent seconds on tick and layout bookkeeping)."""
    h, w, _ = rows[0][0].shape
    out = np.full((len(rows) * (h + GAP) - GAP, width * (w + GAP) - GAP, 3), 255, np.uint8)
    for r, imgs in enumerate(rows):
        for i, img in enumerate(imgs[:width]):
            out[r * (h + GAP) : r * (h + GAP) + h, i * (w + GAP) : i * (w + GAP) + w] = img  # grey broadcasts to RGB
    return out


def _mosaic_axes(ax, rows: list[list[np.ndarray]], width: int, labels: list[str], fontsize: float = 10) -> tuple:
    """Draw a mosaic on `ax`, each row labelled at its centre; returns the cell size (h, w) in pixels."""
    h, w, _ = rows[0][0].shape
    ax.imshow(mosaic(rows, width), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([r * (h + GAP) + (h - 1) / 2 for r in range(len(rows))], labels, fontsize=fontsize)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    return h, w


def fig_samples(label: str, grids: list[tuple[int, np.ndarray]], n_show: int = 12) -> bytes | None:
    """Sample grid: one row per (iteration, its samples), the same sample indices 0..n_show-1 in every row."""
    import matplotlib.pyplot as plt

    grids = [(t, imgs) for t, imgs in grids if len(imgs)]
    if not grids:
        return None
    fig, ax = plt.subplots(figsize=(0.8 * n_show, 0.85 * len(grids) + 0.5))
    _mosaic_axes(ax, [list(imgs[:n_show]) for _, imgs in grids], n_show, [f"it {t}" for t, _ in grids])
    fig.suptitle(f"{label}: samples 0..{n_show - 1} at every iteration")
    fig.tight_layout()
    return png(fig)


def fig_pairs(label: str, data: list[tuple[int, list]]) -> bytes | None:
    """Per iteration, the generated samples closest to a training image (top) above that image (bottom);
    data: (iteration, [(generated, training image, d1, d2), ...])."""
    import matplotlib.pyplot as plt

    data = [(t, pairs) for t, pairs in data if pairs]
    if not data:
        return None
    n = max(len(p) for _, p in data)
    fig, axes = plt.subplots(len(data), 1, figsize=(1.05 * n, 2.5 * len(data) + 0.4), squeeze=False)
    for ax, (t, pairs) in zip(axes[:, 0], data):
        h, w = _mosaic_axes(ax, [[g for g, _, _, _ in pairs], [tr for _, tr, _, _ in pairs]], n,
                            [f"it {t}\ngenerated", "nearest\ntraining"], fontsize=8)
        for j, (_, _, d1, d2) in enumerate(pairs):
            ax.text(j * (w + GAP) + (w - 1) / 2, -0.5, f"d={d1:.2f}\nd1/d2={d1 / d2 if d2 else 1:.2f}", fontsize=7,
                    ha="center", va="bottom")
    fig.suptitle(f"{label}: closest generated samples (top) and the training image each is nearest to (bottom)",
                 fontsize=9)
    fig.tight_layout()
    return png(fig)


def fig_projection(arms: list, colours, real: np.ndarray | None, generated_of, what: str) -> bytes | None:
    """Real and generated vectors on the real data's top two principal directions, with density contours.

    real: (n, d) real vectors; generated_of(arm, t): that iteration's generated vectors, or None."""
    import matplotlib.pyplot as plt
    from scipy.stats import gaussian_kde

    if real is None or len(real) < 3:
        return None
    rv = np.asarray(real, np.float64)
    mu, P = principal_directions(rv, 2, 0, "report-projection")
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
    return png(fig)


def probe_figure(rows: list[dict]) -> bytes | None:
    """Memorization (ratio test, copy test) and normalised score against training steps, one line per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return None
    sizes = sorted({r["size"] for r in rows})
    colours = palette(len(sizes))
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
    return png(fig)
