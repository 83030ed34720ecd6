"""The report: figures from a real (tiny) run, several runs compared, partial runs, and a real browser."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from model_collapse.config import resolve_config
from model_collapse.loop import run_loop
from model_collapse.report import entropy_generalization, write_report

TINY = ["n_train=24", "iterations=3", "train_steps=16", "checkpoint_every=8", "batch_size=8", "sample_steps=4",
        "workers=1", "report=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    run_loop(resolve_config("smoke", TINY), base / "a", show=False)
    run_loop(resolve_config("smoke", TINY + ["seed=1", 'spaces=["pixel", "domain"]', "domain_steps=40"]), base / "b",
             show=False)
    return base


def _imgs(html_text):
    import re

    return re.findall(r"<img alt='([^']+)' src='data:image/png;base64,", html_text)


def test_report_has_every_figure(runs):
    out = write_report([runs / "a"], runs / "a" / "report.html")
    text = out.read_text()
    names = _imgs(text)
    for expected in ("curves.png", "entropy_vs_generalization.png", "samples_00.png", "samples_01.png",
                     "pairs_00.png", "pairs_01.png", "projection.png"):
        assert expected in names, expected
        assert (runs / "a" / "figures" / expected).stat().st_size > 1000
    assert "Pearson r" in text and "<table>" in text and "&quot;n_train&quot;: 24" in text
    assert "<script" not in text


def test_report_shows_every_measured_feature_space(runs):
    from model_collapse.rundir import read_metrics

    out = write_report([runs / "b"], runs / "b" / "report.html")
    names = _imgs(out.read_text())
    assert "projection.png" in names and "projection_domain.png" in names
    assert "entropy_vs_generalization_domain.png" in names and "In domain space: Pearson r" in out.read_text()
    assert (runs / "b" / "figures" / "projection_domain.png").stat().st_size > 1000
    assert "projection_domain.png" not in _imgs(write_report([runs / "a"], runs / "a-only.html").read_text())
    rows = read_metrics(runs / "b" / "metrics.jsonl")
    assert all(0 <= r["precision_domain"] <= 1 and 0 <= r["recall_domain"] <= 1 for r in rows)


def test_report_compares_several_runs(runs):
    out = write_report([runs / "a", runs / "b"], runs / "both.html")
    text = out.read_text()
    assert "a/replace-random" in text and "b/replace-greedy-k2" in text
    assert len([n for n in _imgs(text) if n.startswith("samples_")]) == 4


def test_report_on_partial_run(runs, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(runs / "a", part)
    lines = (part / "metrics.jsonl").read_text().splitlines(keepends=True)
    (part / "metrics.jsonl").write_text("".join(lines[:3]))
    shutil.rmtree(part / "arms" / "replace-greedy-k2" / "iter_002")
    text = write_report([part], part / "r.html").read_text()
    assert "curves.png" in _imgs(text)
    (part / "metrics.jsonl").write_text("")  # started, no row yet: the report still writes
    assert "Claims" in write_report([part], part / "r.html").read_text()


def test_pearson_r_of_the_correlation_figure():
    class A:  # a minimal arm: rows and where each iteration's samples are
        def __init__(self, label, rows, run="r"):
            self.label, self.rows, self.all_rows, self.run = label, rows, rows, Path(run)

        def iter_dir(self, t):
            return self.run / self.label / str(t)

    rows = [{"iteration": t, "train_entropy_pixel": e, "gen_score_pixel": g}
            for t, (e, g) in enumerate([(10, 3.0), (5, 2.0), (1, 1.5), (-3, 1.1)])]
    c = entropy_generalization([A("x", rows)])
    assert c["n"] == 4
    xs = [r["train_entropy_pixel"] for r in rows]
    ys = np.log([r["gen_score_pixel"] for r in rows])
    assert c["pearson_r"] == pytest.approx(np.corrcoef(xs, ys)[0, 1])


def _chromium():
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


def test_report_renders_in_headless_chromium(runs, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium package); browser test skipped")
    from playwright.sync_api import sync_playwright

    out = write_report([runs / "a"], tmp_path / "report.html")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"])
        try:
            ctx = b.new_context(viewport={"width": 1400, "height": 1000})
            page = ctx.new_page()
            page.goto(out.resolve().as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        finally:
            b.close()
    assert len(widths) >= 7
    assert all(complete and w > 0 for complete, w in widths), widths
    assert (tmp_path / "report.png").stat().st_size > 10000


def test_a_report_of_two_runs_leaves_each_runs_own_figures_as_they_were(runs, tmp_path):
    own = {}
    for name in ("a", "b"):
        write_report([runs / name], runs / name / "report.html")
        own[name] = {p.name: p.read_bytes() for p in (runs / name / "figures").iterdir()}
        assert "curves.png" in own[name]
    out = write_report([runs / "a", runs / "b"], tmp_path / "cmp" / "both.html")
    for name in ("a", "b"):
        assert {p.name: p.read_bytes() for p in (runs / name / "figures").iterdir()} == own[name]
    assert (tmp_path / "cmp" / "both_figures" / "curves.png").stat().st_size > 1000
    assert out.exists()


def test_fid_command_and_the_loop_measure_alike(runs, tmp_path, capsys):
    """The same samples against the same real data: the loop's row and `model-collapse fid` agree on the Frechet
    distance, KID and its spread, precision/recall and density/coverage (one measurement rule)."""
    import json

    from model_collapse.cli import main
    from model_collapse.rundir import read_metrics

    row = [r for r in read_metrics(runs / "a" / "metrics.jsonl") if r["iteration"] == 2][0]
    with np.load(runs / "a" / "arms" / row["arm"] / "iter_002" / "samples.npz") as z:
        np.save(tmp_path / "gen.npy", z["images"][: row["n_generated"]])
    assert main(["fid", str(tmp_path / "gen.npy"), "--ref", "digits", "--seed", "0", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("fd", "kid", "kid_std", "precision", "recall", "density", "coverage"):
        assert out[key] == pytest.approx(row[f"{key}_pixel"], rel=1e-12, abs=1e-15), key
    assert out["kid_std"] > 0  # subsets of half the samples differ


def test_a_damaged_stage_file_or_config_is_refused_in_one_line_and_nothing_is_written(runs, tmp_path, capsys):
    """`report` on a run whose stage files or config were damaged from outside: exit 2, one line naming the file,
    and no figure or HTML written (figures are written only once every one is drawn)."""
    import json

    from model_collapse.cli import main

    damages = {
        "samples truncated": ("iter_000/samples.npz", lambda f: f.write_bytes(f.read_bytes()[:100])),
        "samples without images": ("iter_000/samples.npz", lambda f: np.savez(f, other=np.zeros(3))),
        "samples of another shape": ("iter_000/samples.npz", lambda f: np.savez(f, images=np.zeros((3, 5)))),
        "neighbours beyond the training set": (
            "iter_000/neighbours_pixel.npz",
            lambda f: np.savez(f, nearest=np.full(16, 10**6), d1=np.ones(16), d2=np.ones(16))),
        "train garbage": ("iter_000/train.npz", lambda f: f.write_bytes(b"PK\x03\x04garbage")),
        "losses of text": ("iter_000/loss.npz", lambda f: np.savez(f, loss=np.array(["a", "b"]))),
        "config with no seeds": ("config.json", lambda f: f.write_text(json.dumps({**json.loads(f.read_text()),
                                                                                   "seeds": []}))),
        "config with an unknown paradigm": ("config.json", lambda f: f.write_text(f.read_text().replace(
            '"paradigm": "replace"', '"paradigm": "teleport"'))),
        "config with 10^12 iterations": ("config.json", lambda f: f.write_text(json.dumps(
            {**json.loads(f.read_text()), "iterations": 10**12}))),
    }
    for name, (rel, damage) in damages.items():
        run = tmp_path / name.replace(" ", "-")
        shutil.copytree(runs / "a", run)
        shutil.rmtree(run / "figures", ignore_errors=True)
        damage(run / rel)
        before = sorted(p.relative_to(run) for p in run.rglob("*"))
        rc = main(["report", str(run)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and rel.split("/")[-1] in err[0], (name, err)
        assert sorted(p.relative_to(run) for p in run.rglob("*")) == before, name
