"""The visual report: one self-contained HTML file (figures embedded, no JavaScript) plus each figure as a PNG.

Works on finished, running or interrupted runs (it shows what exists) and on several run directories at once
(arms labelled run/arm). Each arm keeps one colour in every figure.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model_collapse.claims import check_claims
from model_collapse.config import ArmConfig, RunConfig, stored_config, study_seeds
from model_collapse.errors import UserError
from model_collapse.data import load_images, pixel_vectors
from model_collapse.figures import (
    fig_correlation,
    fig_curves,
    fig_losses,
    fig_pairs,
    fig_projection,
    fig_samples,
    finite,
    palette,
    probe_figure,
)
from model_collapse.metrics import distinct_index
from model_collapse.rundir import (REDO, RunDir, atomic_write_bytes, read_json_object, read_metrics, read_probe,
                                   stage_array)
from model_collapse.summary import arm_statistics

@dataclass
class Arm:
    """One arm of one run, as the report reads it: the rows of its first seed (whose files the grids, pairs and
    projections show), the statistics over all its seeds, and where its files are (asked of the run
    directory's layout, `rundir.RunDir`)."""

    label: str
    rd: RunDir  # the first seed's study directory
    cfg: RunConfig
    arm: ArmConfig
    rows: list[dict] = field(default_factory=list)  # first seed's rows, by iteration
    all_rows: list[dict] = field(default_factory=list)  # every seed's rows
    stats: dict = field(default_factory=dict)  # metric -> interval per iteration (summary.arm_statistics)

    @property
    def verdicts(self) -> list | None:
        """The verdict per iteration where the arm has one seed (with several, each seed has its own)."""
        if len({r.get("seed") for r in self.all_rows}) > 1:
            return None
        v = {r["iteration"]: r.get("verdict") for r in self.rows}
        return [v.get(t) for t in range(self.cfg.iterations)]

    def iter_dir(self, t: int) -> Path:
        """Where the arm's samples and measurements of iteration t are."""
        return self.rd.arm_sample_dir(self.cfg, self.arm, t)

    def train_dir(self, t: int) -> Path:
        return self.rd.iter_dir(self.arm.label(), t)


def _load_arms(run_dirs: list[Path]) -> tuple[list[Arm], dict]:
    arms, configs = [], {}
    names = [Path(d).resolve().name for d in run_dirs]
    for i, (d, nm) in enumerate(zip(run_dirs, names)):
        if names.count(nm) > 1:
            nm = f"{nm}#{i}"
        root = RunDir(Path(d))
        stored = read_json_object(root.config_path, "run config")
        configs[nm] = stored
        cfg = stored_config(stored, root.config_path)
        rows = read_metrics(root.metrics_path)
        first = study_seeds(cfg)[0]
        stats = arm_statistics(rows, cfg)
        for a in cfg.arms:
            lab = a.label()
            label = lab if len(run_dirs) == 1 else f"{nm}/{lab}"
            mine = [r for r in rows if r["arm"] == lab]
            arms.append(Arm(label, root.study_dir(cfg, first), cfg, a,
                            sorted((r for r in mine if r.get("seed", cfg.seed) == first), key=lambda r: r["iteration"]),
                            mine, stats.get(lab, {})))
    return arms, configs


def figures_dir(run_dirs: list[Path], out: Path) -> Path:
    """Where a report's PNG figures go: RUN_DIR/figures for a report of one run written inside that run;
    otherwise a folder next to the HTML file named after it, so that a comparison never overwrites a run's
    own figures."""
    out = Path(out)
    if len(run_dirs) == 1 and out.resolve().parent == Path(run_dirs[0]).resolve():
        return RunDir(Path(run_dirs[0])).figures_dir
    return out.parent / f"{out.stem}_figures"


def _sample_grids(a: Arm) -> list[tuple[int, np.ndarray]]:
    grids = []
    for r in a.rows:
        f = a.iter_dir(r["iteration"]) / "samples.npz"
        if f.exists():
            grids.append((r["iteration"], stage_array(f, "images")))
    return grids


def _pairs(a: Arm) -> list[tuple[int, list]]:
    its = [r["iteration"] for r in a.rows]
    data = [(t, nearest_pairs(a, t)) for t in (sorted({its[0], its[-1]}) if its else [])]
    return [(t, p) for t, p in data if p]


def entropy_generalization(arms: list[Arm], space: str = "pixel") -> dict:
    """Training-set entropy against log generalization score over all (seed, arm, iteration) points:
    least-squares line and Pearson r (the paper's headline relation, r = 0.91 there)."""
    seen, xs, ys, who = set(), [], [], []
    for a in arms:
        for r in a.all_rows:
            e, g = r.get(f"train_entropy_{space}"), r.get(f"gen_score_{space}")
            if not (finite(e) and finite(g) and g > 0):
                continue
            key = (r.get("seed"), str(a.iter_dir(r["iteration"])))
            if key in seen:  # iteration 0 is shared by the arms of one seed: one point
                continue
            seen.add(key)
            xs.append(e), ys.append(math.log(g)), who.append(a.label)
    out = {"n": len(xs), "x": xs, "y": ys, "arm": who, "pearson_r": None, "slope": None, "intercept": None}
    if len(xs) >= 3 and np.std(xs) > 0 and np.std(ys) > 0:
        out["pearson_r"] = float(np.corrcoef(xs, ys)[0, 1])
        out["slope"], out["intercept"] = (float(v) for v in np.polyfit(xs, ys, 1))
    return out


def nearest_pairs(arm: Arm, t: int, n_pairs: int = 8):
    """The generated samples closest to a training image, with that image and the distance."""
    d = arm.iter_dir(t)
    if not all((d / f).exists() for f in ("neighbours_pixel.npz", "samples.npz")) or \
            not (arm.train_dir(t) / "train.npz").exists():
        return None
    f = d / "neighbours_pixel.npz"
    nearest, d1, d2 = (stage_array(f, k) for k in ("nearest", "d1", "d2"))
    gen = stage_array(d / "samples.npz", "images")
    train = stage_array(arm.train_dir(t) / "train.npz", "images")
    keep = distinct_index(pixel_vectors(train))
    if not len(nearest) == len(d1) == len(d2) <= len(gen) or gen.shape[1:] != train.shape[1:] or \
            (len(nearest) and not 0 <= nearest.min() <= nearest.max() < len(keep)):
        raise UserError(f"{f}: does not match the stage's samples and training set (damaged file); {REDO}")
    order = np.argsort(d1, kind="stable")[:n_pairs]
    return [(gen[i], train[keep[nearest[i]]], float(d1[i]), float(d2[i])) for i in order]



def _pixel_samples(a: Arm, t: int) -> np.ndarray | None:
    f = a.iter_dir(t) / "samples.npz"
    return pixel_vectors(stage_array(f, "images")) if f.exists() else None


def _space_samples(space: str):
    """The generated features an iteration cached while it was measured (its first n_eval samples)."""
    def get(a: Arm, t: int) -> np.ndarray | None:
        f = a.iter_dir(t) / f"features_{space}.npz"
        return stage_array(f, "generated", ndim=2) if f.exists() else None

    return get


# ---------------------------------------------------------------------------------------------- HTML

CSS = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:6px 0}
.verdict-copying{color:#b00;font-weight:bold}.verdict-contracting{color:#a60}
.claim-holds{background:#e3f5e1}.claim-fails{background:#fbe0e0}.claim-inconclusive{background:#fff6d6}
.claim-skipped{color:#888}
pre{background:#f7f7f7;padding:8px;font-size:11px;overflow:auto}.note{color:#555;font-size:13px}"""

TABLE_KEYS = ["seed", "iteration", "n_train", "train_entropy_pixel", "train_duplicates", "train_spacing_pixel",
              "gen_score_pixel", "gen_score_ratio_pixel", "mem_fraction_pixel", "copy_fraction_pixel",
              "variance_pixel", "fd_pixel", "train_real_fraction", "verdict"]


def _claims_table(run: str, claims: list[dict], cfg: RunConfig) -> str:
    """The claims first, colour-coded by verdict."""
    seeds = study_seeds(cfg)
    head = (f"<h2>Claims{' of ' + html.escape(run) if run else ''}</h2><p class='note'>Each effect is a mean over "
            f"{len(seeds)} seed(s) with its 95% Student-t interval (paired within seeds where two arms are "
            f"compared); quality = {html.escape(cfg.quality_metric)}. holds: the interval lies on the claimed "
            f"side of the threshold; fails: on the other side; inconclusive: it straddles the threshold. sd over "
            f"seeds: of the per-seed effects; sampling sd: the KID's own spread over subsets of one row's "
            f"samples.</p>")
    rows = []
    for c in claims:
        ci = "" if c["ci_low"] is None else f"[{c['ci_low']:.4g}, {c['ci_high']:.4g}]"
        eff = "" if c["effect"] is None else f"{c['effect']:.4g}"
        rows.append(f"<tr class='claim-{c['verdict']}'><td>{html.escape(c['id'])}</td>"
                    f"<td style='text-align:left'>{html.escape(c['claim'])}</td><td>{eff}</td><td>{ci}</td>"
                    f"<td>{html.escape(c['direction'])} {c['threshold']:g}</td><td>{c['n_seeds']}</td>"
                    f"<td>{_cell(c.get('seed_sd'))}</td><td>{_cell(c.get('sampling_sd'))}</td>"
                    f"<td><b>{html.escape(c['verdict'])}</b> {html.escape(c.get('reason', ''))}</td></tr>")
    return (head + "<table><tr><th>id</th><th>claim</th><th>effect</th><th>95% CI</th><th>holds if</th>"
            "<th>seeds</th><th>sd over seeds</th><th>sampling sd</th><th>verdict</th></tr>" + "".join(rows)
            + "</table>")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return html.escape(",".join(str(x) for x in v))
    return html.escape(str(v))


def _table(arm: Arm) -> str:
    keys = TABLE_KEYS + sorted({k for r in arm.all_rows for k in r} - set(TABLE_KEYS)
                               - {"arm", "verdict_evidence", "paradigm", "selector", "pool_factor", "n_generated"})
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    body = []
    for r in sorted(arm.all_rows, key=lambda r: (r.get("seed", 0), r["iteration"])):
        cells = []
        for k in keys:
            v = r.get(k, "")
            cls = f' class="verdict-{v}"' if k == "verdict" else ""
            title = f' title="{html.escape(json.dumps(r.get("verdict_evidence", {})))}"' if k == "verdict" else ""
            cells.append(f"<td{cls}{title}>{_cell(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def check_places(run_dirs: list[Path], out: Path) -> None:
    """Where the report's HTML and figures go, checked before any work: nothing is written when it cannot be."""
    figdir = figures_dir([Path(d) for d in run_dirs], out)
    if Path(out).is_dir():
        raise UserError(f"{out}: is a folder where the report's HTML is written; move it away")
    if figdir.exists() and not figdir.is_dir():
        raise UserError(f"{figdir}: is a file where the report's figures are written; move it away")


def write_report(run_dirs: list[Path], out: Path, show: bool = False) -> Path:
    """Write the HTML report of one or more run directories to `out`, and every figure as a PNG under
    `figures_dir(run_dirs, out)`."""
    import matplotlib

    matplotlib.use("Agg")
    check_places(run_dirs, out)
    dirs = [Path(d) for d in run_dirs]
    probes = [d for d in dirs if (d / "probe_config.json").exists() and not (d / "config.json").exists()]
    run_dirs = [d for d in dirs if d not in probes]
    arms, configs = _load_arms(run_dirs)
    colours = palette(len(arms))
    figdir = figures_dir(run_dirs or probes, out)
    figures: list[tuple[str, str, bytes]] = []  # (section, file name, png), written once every one is drawn

    def add(section, name, png):
        if png is not None:
            figures.append((section, name, png))

    add("Metrics over iterations", "curves.png", fig_curves(arms, colours))
    add("Training loss", "losses.png", fig_losses(arms, colours, lambda a, t: RunDir.read_losses(a.train_dir(t))))
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
        add("Sample grids", f"samples_{i:02d}.png", fig_samples(a.label, _sample_grids(a)))
    for i, a in enumerate(arms):
        add("Nearest-neighbour pairs", f"pairs_{i:02d}.png", fig_pairs(a.label, _pairs(a)))
    real = None
    if configs:  # (probes only: nothing to project)
        first_cfg = next(iter(configs.values()))
        try:
            real = load_images(first_cfg["data"], first_cfg.get("data_root"), False,
                               first_cfg.get("image_size")).images
        except Exception as e:  # the report still shows everything else
            print(f"report: no projection figure ({e})", file=sys.stderr)
    if real is not None:
        add("2-D projection", "projection.png", fig_projection(arms, colours, pixel_vectors(real), _pixel_samples,
                                                                 "pixel space"))
    for space in (next(iter(configs.values())).get("spaces", []) if configs else []):
        ref = arms[0].rd.feature_cache(f"real_reference_{space}")  # the first seed's, as the samples shown
        if space != "pixel" and ref.exists():  # written by the run when it measured that space
            add("2-D projection", f"projection_{space}.png",
                fig_projection(arms, colours, stage_array(ref, "features", ndim=2), _space_samples(space),
                               f"{space} space"))
    for i, p in enumerate(probes):
        add("Memorization transition (probe)", f"probe_{i:02d}.png", probe_figure(read_probe(p)))

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>model-collapse report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>model-collapse report: {html.escape(', '.join(str(d) for d in dirs))}</h1>"]
    status = []
    for a in arms:
        its = [r["iteration"] for r in a.rows]
        status.append(f"{html.escape(a.label)}: iterations {its[0]}..{its[-1]}" if its else
                      f"{html.escape(a.label)}: no iteration finished yet")
    parts.append(f"<p class='note'>{'; '.join(status)}. Curves: mean over seeds, band: 95% t interval over "
                 f"seeds. Verdict markers (one seed only): circle stable, triangle contracting, cross copying.</p>")
    tables = []
    for (nm, stored), d in zip(configs.items(), run_dirs):
        cfg = stored_config(stored, RunDir(d).config_path)
        rows = read_metrics(RunDir(d).metrics_path)
        tables.append(_claims_table(nm if len(configs) > 1 else "", check_claims(rows, cfg), cfg))
    parts[2:2] = tables  # the claims first
    if corr["pearson_r"] is not None:
        parts.append(f"<p>Entropy vs log generalization score: Pearson r = <b>{corr['pearson_r']:.3f}</b> over "
                     f"{corr['n']} (seed, arm, iteration) points pooled (the paper reports 0.91; the claim "
                     f"entropy_predicts_gen_score averages each seed's own r instead).</p>")
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
    if figures:
        figdir.mkdir(parents=True, exist_ok=True)
    for _, name, png in figures:
        atomic_write_bytes(figdir / name, png)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, "\n".join(parts).encode())
    if show:
        print(f"report: {out}", file=sys.stderr)
    return out


