"""The loop end to end on tiny data: resume equals uninterrupted, locks, config checks, sample invariance."""

import json
import subprocess
import sys

import numpy as np
import torch
import pytest

from model_collapse import diffusion as D
from model_collapse.config import resolve_config
from model_collapse.errors import UserError
from model_collapse.loop import run_loop
from model_collapse.rundir import RunDir, read_metrics, readable

REQUIRED_KEYS = {"arm", "iteration", "n_train", "train_entropy_pixel", "train_duplicates", "gen_score_pixel",
                 "gen_score_ratio_pixel", "mem_fraction_pixel", "variance_pixel", "fd_pixel", "verdict"}

TINY = ["n_train=24", "iterations=3", "train_steps=24", "checkpoint_every=8", "batch_size=8", "sample_steps=4",
        "workers=1", "report=false"]


class Crash(Exception):
    pass


def tiny_cfg(*extra):
    return resolve_config("smoke", TINY + list(extra))


def crash_greedy_at_step_16(arm, t, step):
    if t == 1 and step == 16 and arm.startswith("replace-greedy"):
        raise Crash()


def whole_and_crashed(cfg, tmp_path) -> None:
    """An uninterrupted run in tmp_path/whole, and one in tmp_path/resumed crashed at iteration 1, step 16 of the
    greedy arm (after its first checkpoint)."""
    run_loop(cfg, tmp_path / "whole", show=False)
    with pytest.raises(Crash):
        run_loop(cfg, tmp_path / "resumed", show=False, on_checkpoint=crash_greedy_at_step_16)


def test_interrupted_run_resumes_to_identical_metrics(tmp_path):
    cfg = tiny_cfg()
    whole_and_crashed(cfg, tmp_path)
    d = tmp_path / "resumed" / "arms" / "replace-greedy-k2" / "iter_001"
    assert (d / "train_state.safetensors").exists() and not (d / "model.safetensors").exists()
    run_loop(cfg, tmp_path / "resumed", show=False)
    assert not (d / "train_state.safetensors").exists()
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert len(a) == len(cfg.arms) * cfg.iterations
    assert a == b
    for t in (1, 2):
        da = tmp_path / "whole" / "arms" / "replace-greedy-k2" / f"iter_{t:03d}"
        db = tmp_path / "resumed" / "arms" / "replace-greedy-k2" / f"iter_{t:03d}"
        assert (da / "model.safetensors").read_bytes() == (db / "model.safetensors").read_bytes()
        for f in ("samples.npz", "train.npz"):
            with np.load(da / f) as za, np.load(db / f) as zb:
                for k in za.files:
                    np.testing.assert_array_equal(za[k], zb[k])


def test_metrics_rows_and_paradigms(tmp_path):
    cfg = tiny_cfg("arms=[{paradigm=\"accumulate\", selector=\"threshold\", pool_factor=2}, "
                   "{paradigm=\"fresh\", selector=\"greedy\", fresh_fraction=0.25}]")
    run_loop(cfg, tmp_path / "r", show=False)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [(r["arm"], r["iteration"]) for r in rows] == [
        (a.label(), t) for t in range(3) for a in cfg.arms]
    for r in rows:
        assert REQUIRED_KEYS <= set(r)
        assert r["n_train"] == 24
    acc = [r for r in rows if r["arm"].startswith("accumulate")]
    fresh = [r for r in rows if r["arm"].startswith("fresh")]
    assert fresh[1]["train_real_fraction"] == pytest.approx(6 / 24)
    assert 0 <= acc[2]["train_real_fraction"] <= 1
    with np.load(tmp_path / "r" / "arms" / acc[2]["arm"] / "iter_002" / "train.npz") as z:
        assert set(np.unique(z["source_iteration"])) <= {-1, 0, 1}
    with np.load(tmp_path / "r" / "arms" / acc[2]["arm"] / "iter_002" / "selection.npz") as z:
        assert str(z["method"]) == "threshold" and len(z["indices"]) == 24 and float(z["tau0"]) > 0
    # precision/recall per row: the samples against a seeded real subset of as many images, k = 5
    from model_collapse.data import load_images, pixel_vectors
    from model_collapse.metrics import precision_recall
    from model_collapse.rng import numpy_rng

    data = load_images(cfg.data).images
    ref = pixel_vectors(data[np.sort(numpy_rng(cfg.seed, "pr-reference").choice(len(data), 24, replace=False))])
    with np.load(tmp_path / "r" / "arms" / fresh[2]["arm"] / "iter_002" / "samples.npz") as z:
        expect = precision_recall(ref, pixel_vectors(z["images"][:24]), k=5)
    assert {k: fresh[2][f"{k}_pixel"] for k in expect} == expect
    assert all(0 <= r["precision_pixel"] <= 1 and 0 <= r["recall_pixel"] <= 1 for r in rows)
    assert all(np.isfinite(r["kid_pixel"]) and r["kid_std_pixel"] > 0 for r in rows)  # subsets differ


def test_second_process_is_refused_while_first_runs(tmp_path):
    cfg = tiny_cfg()
    rd = RunDir.open(tmp_path / "r", cfg)
    try:
        p = subprocess.run([sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(tmp_path / "r"),
                            *sum([["--set", s] for s in TINY], [])], capture_output=True, text=True)
        assert p.returncode == 2 and "in use by another" in p.stderr and "Traceback" not in p.stderr
    finally:
        rd.close()


def test_existing_run_dir_with_other_config_is_refused(tmp_path):
    RunDir.open(tmp_path / "r", tiny_cfg()).close()
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    with pytest.raises(UserError, match="different config"):
        run_loop(tiny_cfg("seed=1"), tmp_path / "r", show=False)
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == before
    # execution-only keys do not make a different experiment
    RunDir.open(tmp_path / "r", tiny_cfg("workers=2", "report=true")).close()


def test_sample_i_does_not_depend_on_how_many_or_which_samples_are_drawn():
    unet = D.build_unet(D.MODEL_PRESETS["tiny"], 8, 1)  # random weights: the hardest case for rounding
    for sampler in ("ddim", "ddpm"):
        a = D.generate(unet, sampler, 6, range(10), 3, ("arm", 1), (8, 8, 1), batch_size=4)
        b = D.generate(unet, sampler, 6, [7, 8, 9], 3, ("arm", 1), (8, 8, 1), batch_size=4)
        c = D.generate(unet, sampler, 6, [9, 2, 5, 0], 3, ("arm", 1), (8, 8, 1), batch_size=4)
        d = D.generate(unet, sampler, 6, range(1, 10, 2), 3, ("arm", 1), (8, 8, 1), batch_size=4)  # process 1 of 2
        np.testing.assert_array_equal(a[7:], b)
        np.testing.assert_array_equal(a[[9, 2, 5, 0]], c)
        np.testing.assert_array_equal(a[1::2], d)
        e = D.generate(unet, sampler, 6, range(10), 4, ("arm", 1), (8, 8, 1), batch_size=4)
        assert not np.array_equal(a, e)  # another seed, other samples


def test_model_shape_checks_name_the_fix():
    with pytest.raises(UserError, match="not divisible by 2\\^\\(levels-1\\) = 32"):
        D.check_model_shape(D.MODEL_PRESETS["unet32"], 28)
    with pytest.raises(UserError, match="norm_groups = 32 does not divide"):
        D.check_model_shape(D.UNetSpec((48, 96), 1, 32), 8)
    D.check_model_shape(D.MODEL_PRESETS["unet48"], 32)


def test_paper_unet_builds_with_attention_at_level_5():
    u = D.build_unet(D.MODEL_PRESETS["unet32"], 32, 3)
    assert list(u.config.block_out_channels) == [32, 32, 64, 64, 128, 128]
    assert u.config.down_block_types[4] == "AttnDownBlock2D" and u.config.up_block_types[1] == "AttnUpBlock2D"
    assert u.config.layers_per_block == 2


def test_smoke_preset_end_to_end_cli(tmp_path):
    p = subprocess.run([sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(tmp_path / "s"),
                        "--json", "--set", "report=false"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout)
    assert set(summary["arms"]) == {"replace-random", "replace-greedy-k2"} and summary["complete"]
    rows = read_metrics(tmp_path / "s" / "metrics.jsonl")
    assert len(rows) == 4 and all(REQUIRED_KEYS <= set(r) for r in rows)
    cfg = json.loads((tmp_path / "s" / "config.json").read_text())
    assert cfg["n_train"] == 32
    # rerunning a finished run is a no-op that prints the same summary
    q = subprocess.run([sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(tmp_path / "s"),
                        "--json", "--set", "report=false"], capture_output=True, text=True, timeout=300)
    assert q.returncode == 0 and json.loads(q.stdout)["arms"] == summary["arms"]


def test_gpu_check_script_cpu_path(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-tiny", "--out", str(tmp_path / "g.json")],
                       capture_output=True, text=True, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "g.json").read_text())
    assert res["train_steps_per_s"] > 0 and res["ddpm_images_per_s"] > 0 and res["ddim_images_per_s"] > 0


def test_guided_conditional_loop_end_to_end(tmp_path):
    cfg = resolve_config("guided", ["n_train=30", "iterations=2", "train_steps=12", "batch_size=8",
                                    "sample_steps=3", "workers=1", "report=false", "domain_steps=20",
                                    "arms.1.selector=\"greedy\"", "arms.1.per_class=true", "arms.1.pool_factor=2"])
    run_loop(cfg, tmp_path / "g", show=False)
    rows = read_metrics(tmp_path / "g" / "metrics.jsonl")
    assert len(rows) == 4
    for r in rows:
        assert len(r["gen_class_counts"]) == 10 and sum(r["gen_class_counts"]) == 30
        assert 0 <= r["gen_class_agreement"] <= 1
        assert "fd_domain" in r and "train_entropy_domain" in r
    with np.load(tmp_path / "g" / "arms" / rows[-1]["arm"] / "iter_001" / "train.npz") as z:
        counts = np.bincount(z["labels"], minlength=10)
    assert counts.sum() == 30 and counts.max() - counts.min() <= 1  # per-class selection keeps the balance
    assert (tmp_path / "g" / "features" / "domain.safetensors").exists()


def test_arms_with_their_own_guidance_sample_iteration_0_themselves(tmp_path):
    cfg = resolve_config("guided", ["n_train=20", "iterations=2", "train_steps=10", "batch_size=8",
                                    "sample_steps=3", "workers=1", "report=false", "domain_steps=10",
                                    "spaces=[\"pixel\"]"])
    run_loop(cfg, tmp_path / "g", show=False)
    rows = {(r["arm"], r["iteration"]): r for r in read_metrics(tmp_path / "g" / "metrics.jsonl")}
    w0, w2 = (a.label() for a in cfg.arms)
    own = tmp_path / "g" / "arms" / w2 / "iter_000" / "samples.npz"
    assert own.exists() and not (tmp_path / "g" / "arms" / w0 / "iter_000").exists()
    with np.load(tmp_path / "g" / "iter_000" / "samples.npz") as a, np.load(own) as b:
        assert not np.array_equal(a["images"], b["images"])  # guided samples of the same model
    assert rows[(w0, 0)]["gen_score_pixel"] != rows[(w2, 0)]["gen_score_pixel"]
    assert rows[(w0, 0)]["train_entropy_pixel"] == rows[(w2, 0)]["train_entropy_pixel"]  # one training set
    with np.load(tmp_path / "g" / "arms" / w0 / "iter_001" / "train.npz") as a, \
            np.load(tmp_path / "g" / "arms" / w2 / "iter_001" / "train.npz") as b:
        assert not np.array_equal(a["images"], b["images"])


def test_sigkilled_run_resumes_to_the_metrics_of_an_uninterrupted_run(tmp_path):
    """A real crash: SIGKILL the process mid-training (after its first checkpoint), rerun the same command."""
    import os
    import signal
    import time

    sets = ["n_train=24", "iterations=2", "train_steps=60", "checkpoint_every=5", "batch_size=8",
            "sample_steps=4", "workers=1", "report=false"]
    cmd = lambda out: [sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(out), "--quiet",
                       *sum([["--set", s] for s in sets], [])]
    whole = subprocess.run(cmd(tmp_path / "whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(cmd(tmp_path / "crash"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpt = tmp_path / "crash" / "iter_000" / "train_state.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "crash" / "iter_000" / "model.safetensors").exists(), "the kill came too late"
    again = subprocess.run(cmd(tmp_path / "crash"), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert read_metrics(tmp_path / "crash" / "metrics.jsonl") == read_metrics(tmp_path / "whole" / "metrics.jsonl")


def test_killed_at_ten_random_moments_the_run_still_ends_as_an_uninterrupted_one(tmp_path):
    """SIGKILL to the process group at ten seeded random moments of a small two-arm run, each kill followed by
    the same command again; after every kill the rows written so far are a prefix of the uninterrupted run's
    (nothing duplicated, nothing damaged), and the run finished by the eleventh start has its metrics exactly."""
    import os
    import signal
    import time

    sets = ["n_train=16", "iterations=2", "train_steps=40", "checkpoint_every=4", "batch_size=8",
            "sample_steps=3", "workers=1", "report=false"]
    cmd = lambda out: [sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(out), "--quiet",
                       *sum([["--set", s] for s in sets], [])]
    t = time.perf_counter()
    whole = subprocess.run(cmd(tmp_path / "whole"), capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    took = time.perf_counter() - t
    want = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    key = lambda r: (r["arm"], r["iteration"])
    moments = np.random.default_rng(16).uniform(0.2, 1.0, 10) * took
    crash = tmp_path / "crash"
    finished_early = 0
    for moment in moments:
        proc = subprocess.Popen(cmd(crash), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            assert proc.wait(timeout=moment) == 0, proc.stderr.read()[-2000:]
            finished_early += 1
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
        if (crash / "metrics.jsonl").exists():
            got = read_metrics(crash / "metrics.jsonl")
            assert len({key(r) for r in got}) == len(got), "a row was written twice"
            assert all(r == next(w for w in want if key(w) == key(r)) for r in got)
    assert finished_early < len(moments), "no kill landed: the run is too short for this test"
    again = subprocess.run(cmd(crash), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(read_metrics(crash / "metrics.jsonl"), key=key) == sorted(want, key=key)


def test_an_arm_that_fails_stops_the_run_within_seconds(tmp_path):
    """One arm fails at its first selection (a threshold filter that would need billions of passes, which only
    the pool's diameter tells) while the other would train for minutes: the run stops within 30 s, names the
    failed arm, and leaves no worker behind."""
    import shutil
    import time

    import multiprocessing as mp

    run_loop(tiny_cfg("iterations=2"), tmp_path / "small", show=False)  # iteration 0, reused below
    cfg = tiny_cfg("iterations=2", "train_steps=200000", "workers=2", "tau0=1e300", "decay=0.99999999",
                   'arms=[{selector="random"}, {selector="threshold", pool_factor=2}]')
    RunDir.open(tmp_path / "big", cfg).close()
    shutil.copytree(tmp_path / "small" / "iter_000", tmp_path / "big" / "iter_000")
    shutil.copytree(tmp_path / "small" / "features", tmp_path / "big" / "features")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="arm replace-threshold-k2.*passes"):
        run_loop(cfg, tmp_path / "big", show=False)
    assert time.perf_counter() - t0 < 30
    assert not mp.active_children()
    assert not (tmp_path / "big" / "arms" / "replace-random" / "iter_001" / "model.safetensors").exists()


SEEDED = TINY[:1] + ["iterations=2"] + TINY[2:] + ["seeds=[0, 1]"]


def test_seeds_are_independent_studies_and_resume_to_identical_metrics(tmp_path):
    cfg = resolve_config("smoke", SEEDED)
    whole = run_loop(cfg, tmp_path / "whole", show=False)

    run_loop(cfg, tmp_path / "resumed", show=False, on_checkpoint=None, only=[(0, None)])
    with pytest.raises(Crash):  # seed 1 crashes mid-training
        run_loop(cfg, tmp_path / "resumed", show=False, on_checkpoint=crash_greedy_at_step_16)
    again = run_loop(cfg, tmp_path / "resumed", show=False)
    a = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    b = read_metrics(tmp_path / "resumed" / "metrics.jsonl")
    assert a == b and [(r["seed"], r["iteration"]) for r in a] == [(s, t) for s in (0, 1) for t in (0, 0, 1, 1)]
    assert whole["claims"] == again["claims"] and whole["complete"]
    for s in (0, 1):
        assert (tmp_path / "whole" / f"seed_{s:03d}" / "iter_000" / "model.safetensors").exists()
    # each seed its own real subset, models and samples
    with np.load(tmp_path / "whole" / "seed_000" / "iter_000" / "train.npz") as z0, \
            np.load(tmp_path / "whole" / "seed_001" / "iter_000" / "train.npz") as z1:
        assert not np.array_equal(z0["source_index"], z1["source_index"])
    # a seed's study equals a one-seed run with that seed
    single = run_loop(resolve_config("smoke", SEEDED[:-1] + ["seed=1"]), tmp_path / "single", show=False)
    assert [dict(r, verdict_evidence=None) for r in a if r["seed"] == 1] == \
        [dict(r, verdict_evidence=None) for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    assert single["claims"][0]["verdict"] == "inconclusive"  # one seed: no interval
    st = whole["stats"]["replace-random"]["train_entropy_pixel"][1]
    vals = [r["train_entropy_pixel"] for r in a if r["arm"] == "replace-random" and r["iteration"] == 1]
    assert st["n"] == 2 and st["mean"] == pytest.approx(np.mean(vals)) and st["ci_low"] < st["mean"] < st["ci_high"]


def test_slices_run_into_a_shared_run_dir_and_merge(tmp_path):
    """A scheduler's job array: each (seed, arm) slice in its own process into one RUN_DIR; the same slice
    twice at once is refused; the merged rows equal a whole run's."""
    cfg = resolve_config("smoke", SEEDED)
    run_loop(cfg, tmp_path / "whole", show=False)
    base = [sys.executable, "-m", "model_collapse", "run", "smoke", "--out", str(tmp_path / "sl"), "--quiet",
            "--json", *sum([["--set", s] for s in SEEDED], [])]
    RunDir.open(tmp_path / "sl", cfg).close()
    held = RunDir(tmp_path / "sl" / "seed_001")
    with held.hold("slice-replace-random"):
        p = subprocess.run(base + ["--only", "1/replace-random"], capture_output=True, text=True)
        assert p.returncode == 2 and "being run by another" in p.stderr and "Traceback" not in p.stderr
    # one slice alone: its rows show at once, before the other arm of its seed has any
    part = run_loop(cfg, tmp_path / "sl", show=False, only=[(0, 1)])
    assert [(r["arm"], r["iteration"]) for r in read_metrics(tmp_path / "sl" / "metrics.jsonl")] == \
        [("replace-random", 0), ("replace-greedy-k2", 0), ("replace-greedy-k2", 1)]
    assert not part["complete"]
    procs = [subprocess.Popen(base + ["--only", f"@{i}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1500:] for o in outs]
    key = lambda r: (r["seed"], r["iteration"], r["arm"])
    assert sorted(read_metrics(tmp_path / "sl" / "metrics.jsonl"), key=key) == \
        sorted(read_metrics(tmp_path / "whole" / "metrics.jsonl"), key=key)
    assert json.loads((tmp_path / "sl" / "summary.json").read_text())["complete"]
    bad = subprocess.run(base + ["--only", "7"], capture_output=True, text=True)
    assert bad.returncode == 2 and "not one of the run's seeds" in bad.stderr


def test_train_factor_and_equal_share_arms(tmp_path):
    cfg = tiny_cfg('arms=[{selector="random", pool_factor=2, train_factor=2}, '
                   '{paradigm="accumulate", selector="random", accumulate_mix="equal_share"}]')
    run_loop(cfg, tmp_path / "r", show=False)
    rows = {(r["arm"], r["iteration"]): r for r in read_metrics(tmp_path / "r" / "metrics.jsonl")}
    assert rows[("replace-random-k2-x2", 1)]["n_train"] == 48 and rows[("replace-random-k2-x2", 0)]["n_train"] == 24
    with np.load(tmp_path / "r" / "arms" / "accumulate-random-equal_share" / "iter_002" / "train.npz") as z:
        assert sorted(np.bincount(z["source_iteration"] + 1).tolist()) == [8, 8, 8]
    with pytest.raises(UserError, match="train_factor"):
        tiny_cfg('arms=[{selector="random", train_factor=2}]')


def test_reference_selectors_in_the_loop_and_in_a_feature_space(tmp_path):
    """gated in replace, herding and capped in accumulate (these two in the domain feature space) measure
    candidates against the real training set."""
    from model_collapse.data import pixel_vectors
    from model_collapse.selection import select

    cfg = tiny_cfg("iterations=2", 'spaces=["pixel", "domain"]', "domain_steps=20",
                   'arms=[{selector="gated", pool_factor=2}, '
                   '{paradigm="accumulate", selector="herding", pool_factor=2, space="domain"}, '
                   '{paradigm="accumulate", selector="capped", pool_factor=2, space="domain"}]')
    run_loop(cfg, tmp_path / "r", show=False)
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert {r["arm"] for r in rows} == {"replace-gated-k2", "accumulate-herding-k2-domain",
                                        "accumulate-capped-k2-domain"} and len(rows) == 6
    it1 = tmp_path / "r" / "arms" / "replace-gated-k2" / "iter_001"
    with np.load(it1 / "selection.npz") as z, np.load(tmp_path / "r" / "iter_000" / "samples.npz") as s, \
            np.load(tmp_path / "r" / "iter_000" / "train.npz") as real:
        assert str(z["method"]) == "gated"
        pool = pixel_vectors(s["images"][:48])
        expect = select(pool, 24, "gated", int(z["seed"]), reference=pixel_vectors(real["images"])).indices
        np.testing.assert_array_equal(z["indices"], expect)
    with np.load(tmp_path / "r" / "arms" / "accumulate-herding-k2-domain" / "iter_001" / "selection.npz") as z:
        assert str(z["method"]) == "herding" and float(z["bandwidth"]) > 0
    with np.load(tmp_path / "r" / "arms" / "accumulate-capped-k2-domain" / "iter_001" / "selection.npz") as z:
        assert str(z["method"]) == "capped" and float(z["spacing"]) > 0 and 1 <= int(z["spread_picks"]) <= 24


def test_damaged_stage_files_are_redone_to_the_same_result(tmp_path, capsys):
    """A truncated samples.npz, a garbage checkpoint and a metrics.json that is not an object: the rerun says so,
    redoes those stages and ends with the rows and files of an uninterrupted run."""
    cfg = tiny_cfg()
    whole_and_crashed(cfg, tmp_path)
    r = tmp_path / "resumed"
    samples = sorted(r.rglob("iter_000/samples.npz"))[0]
    samples.write_bytes(samples.read_bytes()[:200])
    (r / "arms" / "replace-greedy-k2" / "iter_001" / "train_state.safetensors").write_bytes(b"not a checkpoint")
    metrics = sorted(r.rglob("iter_000/metrics.json"))[0]
    metrics.write_text("[1, 2]")
    # and the run's caches: the real data's statistics and its reference subset
    caches = [r / "features" / "real_stats_pixel.npz", r / "features" / "real_reference_pixel.npz"]
    caches[0].write_bytes(caches[0].read_bytes()[:100])  # truncated
    np.savez(caches[1], other=np.zeros(3))  # whole, but not what the cache holds
    capsys.readouterr()
    run_loop(cfg, r, show=False)
    err = capsys.readouterr().err
    assert err.count("is damaged; moved to") == 3 + len(caches), err
    assert all(c.with_name(c.name + ".damaged").exists() and readable(c) for c in caches)
    assert read_metrics(tmp_path / "whole" / "metrics.jsonl") == read_metrics(r / "metrics.jsonl")
    with np.load(samples) as zb, np.load(tmp_path / "whole" / samples.relative_to(r)) as za:
        for k in za.files:
            np.testing.assert_array_equal(za[k], zb[k])


def test_prepare_sets_the_kernels_that_repeat_and_refuses_uneven_batches(monkeypatch):
    import os

    import torch

    from model_collapse import dist
    from model_collapse.config import resolve_config
    from model_collapse.errors import UserError
    from model_collapse.study import prepare

    prepare(resolve_config("smoke", []))
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setattr(dist, "world", lambda: 3)
    with pytest.raises(UserError, match="batch_size = 8 does not divide among 3 processes"):
        prepare(resolve_config("smoke", ["batch_size=8"]))


def test_every_training_stage_records_its_loss_and_resume_keeps_it(tmp_path):
    """loss.npz beside every model: one finite loss per step; a stage resumed from its checkpoint reports the
    losses of the steps before the crash too, equal to the uninterrupted run's; the report draws them."""
    from model_collapse.report import write_report

    cfg = tiny_cfg()
    whole_and_crashed(cfg, tmp_path)
    run_loop(cfg, tmp_path / "resumed", show=False)
    models = sorted((tmp_path / "whole").rglob("model.safetensors"))
    assert len(models) == 1 + len(cfg.arms) * (cfg.iterations - 1)
    for m in models:
        a = np.load(m.parent / "loss.npz")["loss"]
        b = np.load(tmp_path / "resumed" / m.parent.relative_to(tmp_path / "whole") / "loss.npz")["loss"]
        assert a.shape == (cfg.train_steps,) and np.isfinite(a).all() and (a > 0).all()
        np.testing.assert_array_equal(a, b)
    write_report([tmp_path / "whole"], tmp_path / "whole" / "report.html", show=False)
    assert (tmp_path / "whole" / "figures" / "losses.png").stat().st_size > 1000
    assert "Training loss" in (tmp_path / "whole" / "report.html").read_text()


def test_a_run_starts_from_a_saved_diffusers_unet(tmp_path, capsys):
    """init_from: iteration 0's model is the saved UNet itself (its samples come from it), later iterations train
    fresh models of its architecture; a model that does not fit the data is refused in one line, before anything
    is written."""
    from safetensors.torch import load_file

    from model_collapse.cli import main
    from model_collapse.diffusion import build_unet
    from model_collapse.registry import MODEL_PRESETS

    torch.manual_seed(5)
    saved = build_unet(MODEL_PRESETS["small"], 8, 1)
    saved.save_pretrained(tmp_path / "pipe" / "unet")  # a pipeline folder: the UNet in unet/
    cfg = tiny_cfg(f"init_from={json.dumps(str(tmp_path / 'pipe'))}", "iterations=2")
    run_loop(cfg, tmp_path / "run", show=False)
    got = load_file(str(tmp_path / "run" / "iter_000" / "model.safetensors"))
    for k, v in saved.state_dict().items():
        assert torch.equal(got[k], v), k
    drawn = np.load(tmp_path / "run" / "iter_000" / "samples.npz")["images"]
    saved.eval()
    mine = D.generate(saved, cfg.sampler, cfg.sample_steps, range(len(drawn)), cfg.seed, ("shared", 0), (8, 8, 1),
                      batch_size=cfg.sample_batch)
    np.testing.assert_array_equal(drawn, mine)  # iteration 0's samples are the saved model's
    later = load_file(str(tmp_path / "run" / "arms" / "replace-random" / "iter_001" / "model.safetensors"))
    assert {k: v.shape for k, v in later.items()} == {k: v.shape for k, v in got.items()}
    assert len(np.load(tmp_path / "run" / "iter_000" / "loss.npz")["loss"]) == 0
    build_unet(MODEL_PRESETS["tiny"], 16, 3).save_pretrained(tmp_path / "rgb16")
    from diffusers import UNet2DModel

    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                class_embed_type="timestep").save_pretrained(tmp_path / "timestep")
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                dropout=0.1).save_pretrained(tmp_path / "dropout")
    for path, pattern, extra in (
            (tmp_path / "rgb16", "sample_size is 16, but the run needs 8", []),
            (tmp_path / "nothing", "no diffusers model there", []),
            (tmp_path / "timestep", "class_embed_type 'timestep' is not supported", []),
            (tmp_path / "dropout", "has dropout 0.1, which models trained together", ["--set", "batch_models=true"])):
        out = tmp_path / f"bad-{path.name}"
        rc = main(["run", "smoke", "--out", str(out), "--set", f"init_from={json.dumps(str(path))}", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and pattern in err and "Traceback" not in err and not out.exists(), err


def test_log_with_tensorboard_writes_loss_curves_tensorboard_reads(tmp_path):
    """log_with = "tensorboard": one run per (seed, arm, iteration) under RUN_DIR/tracking, whose train/loss
    scalars, read back by TensorBoard's own reader, are the stage's recorded losses."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg("log_with=\"tensorboard\"", "iterations=2")
    run_loop(cfg, tmp_path / "run", show=False)
    runs = sorted(p.parent for p in (tmp_path / "run" / "tracking").rglob("events.out.tfevents.*"))
    assert [str(p.relative_to(tmp_path / "run" / "tracking")) for p in runs] == \
        ["seed0/replace-greedy-k2/it001", "seed0/replace-random/it001", "seed0/shared/it000"]
    ev = EventAccumulator(str(runs[1]))
    ev.Reload()
    got = [(e.step, e.value) for e in ev.Scalars("train/loss")]
    want = np.load(tmp_path / "run" / "arms" / "replace-random" / "iter_001" / "loss.npz")["loss"]
    assert [s for s, _ in got] == list(range(1, cfg.train_steps + 1))
    np.testing.assert_allclose([v for _, v in got], want, rtol=1e-6)


def test_a_failing_tracker_costs_a_warning_not_the_stage(tmp_path, capsys, monkeypatch):
    import model_collapse.tracking as tracking

    def broken(*_):
        raise RuntimeError("no space left on device")

    monkeypatch.setattr(tracking, "_log", broken)
    run_loop(tiny_cfg("log_with=\"tensorboard\"", "iterations=1"), tmp_path / "run", show=False)
    assert "warning: log_with = tensorboard failed for seed0/shared/it000: no space left" in capsys.readouterr().err
    assert (tmp_path / "run" / "iter_000" / "model.safetensors").exists()
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2


def test_stage_files_that_load_but_hold_something_else_count_as_damaged(tmp_path):
    """readable() checks what a stage writes, not only that it loads: images as uint8 (N, H, W, C), a UNet's
    weights, a checkpoint that knows its step, measurements with the pixel space's numbers; so a resumed run
    redoes such a stage instead of failing inside it (or appending a row of nulls)."""
    import json

    import torch
    from safetensors.torch import save_file

    good_images = np.zeros((3, 8, 8, 1), np.uint8)
    cases = {
        "samples.npz": [(lambda f: np.savez(f, images=good_images), True),
                        (lambda f: np.savez(f, images=np.zeros((3, 5), np.float32)), False),
                        (lambda f: np.savez(f, other=good_images), False)],
        "train.npz": [(lambda f: np.savez(f, images=good_images.astype(np.float32)), False)],
        "model.safetensors": [(lambda f: save_file({"conv_in.weight": torch.zeros(1), "conv_out.weight":
                                                    torch.zeros(1)}, str(f)), True),
                              (lambda f: save_file({"x": torch.zeros(1)}, str(f)), False)],
        "train_state.safetensors": [(lambda f: save_file({"x": torch.zeros(1)}, str(f), metadata={"step": "8"}), True),
                                    (lambda f: save_file({"x": torch.zeros(1)}, str(f)), False)],
        "metrics.json": [(lambda f: f.write_text(json.dumps({"gen_score_pixel": 1.5, "n_train": 8})), True),
                         (lambda f: f.write_text("{}"), False),
                         (lambda f: f.write_text(json.dumps({"gen_score_pixel": "high"})), False),
                         (lambda f: f.write_bytes(b"\xff\xfe garbage"), False)],
    }
    for name, variants in cases.items():
        for i, (write, expected) in enumerate(variants):
            f = tmp_path / str(i) / name
            f.parent.mkdir(exist_ok=True)
            write(f)
            assert readable(f) == expected, (name, i)


def test_jobs_beside_the_caller_fail_and_stop_together():
    """`JobsBeside`: a job's failure interrupts the caller's own work within seconds and is raised as itself; the
    caller's failure (or cancel) stops the jobs (here a minute of sleep) and leaves no worker behind; a job with
    `after` starts only when that job is done; wait_for refuses an unknown name; a user's Ctrl-C while waiting
    stays a KeyboardInterrupt and stops the jobs; SIGUSR1's handling is the process's own again afterwards."""
    import math
    import multiprocessing as mp
    import signal
    import threading
    import time

    from model_collapse.workers import Job, JobsBeside, WorkerError

    t0 = time.perf_counter()
    beside = JobsBeside([Job("bad job", math.sqrt, (-1.0,))], 1)
    with pytest.raises(WorkerError, match="bad job failed: ValueError"):
        try:
            time.sleep(60)  # the caller's long work, cut short
        except BaseException as e:
            beside.cancel()
            raise beside.failure_of(e)
    assert time.perf_counter() - t0 < 20 and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL

    beside = JobsBeside([Job("long job", time.sleep, (60,), after="quick job"), Job("quick job", math.sqrt, (4.0,)),
                         Job("queued job", time.sleep, (60,))], 1)
    with pytest.raises(ValueError, match="no job named"):
        beside.wait_for("no such job")
    beside.wait_for("quick job")  # started first although listed second: the long job waits for it
    t0 = time.perf_counter()
    with pytest.raises(ZeroDivisionError):
        try:
            1 / 0
        except BaseException as e:
            beside.cancel()
            raise beside.failure_of(e)
    assert time.perf_counter() - t0 < 10 and not mp.active_children()

    beside = JobsBeside([Job("long job", time.sleep, (60,))], 1)
    threading.Timer(3.0, lambda: signal.raise_signal(signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C while waiting for the jobs
        beside.wait()
    assert not mp.active_children() and signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_one_seed_on_two_workers_gives_the_files_of_one_process(tmp_path):
    """workers = 2 with one seed: this process trains iteration 0 beside a worker computing the references, the
    arms' workers starting once the references are done; the rows are those of the whole run in one process (at
    these shapes torch's kernels give the same samples at one and two threads), and iteration 0 records the seconds
    of all its parts."""
    one = run_loop(tiny_cfg("iterations=2", "domain_steps=10", 'spaces=["pixel", "domain"]'), tmp_path / "one",
                   show=False)
    two = run_loop(tiny_cfg("iterations=2", "domain_steps=10", 'spaces=["pixel", "domain"]', "workers=2"),
                   tmp_path / "two", show=False)
    # side by side, the arms' rows land in the order their stages finish; the finished file is in (iteration, arm)
    # order, the same bytes as one process's
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [(r["iteration"], r["arm"]) for r in rows] == [(t, a.label()) for t in range(2) for a in tiny_cfg().arms]
    assert (tmp_path / "one" / "metrics.jsonl").read_bytes() == (tmp_path / "two" / "metrics.jsonl").read_bytes()
    assert one["claims"] == two["claims"]
    timings = json.loads((tmp_path / "two" / "iter_000" / "timings.json").read_text())
    assert set(timings) == {"select_s", "train_s", "sample_s", "metrics_s"}
    for name in ("domain.safetensors", "real_stats_domain.npz", "real_reference_domain.npz"):
        assert (tmp_path / "one" / "features" / name).read_bytes() == (tmp_path / "two" / "features" / name).read_bytes()


def test_models_trained_together_give_the_same_files_in_any_grouping_and_after_a_crash(tmp_path):
    """batch_models: two seeds' three arms trained as one batch of six per iteration; the same slice run alone
    (beside a copy of itself) and a run crashed in its batched training and resumed give the same model files,
    samples and metrics rows, bit for bit."""
    cfg = tiny_cfg("seeds=[0,1]", "batch_models=true",
                   "arms=[{selector=\"random\"}, {selector=\"greedy\", pool_factor=2}, "
                   "{paradigm=\"accumulate\", selector=\"random\"}]")
    whole_and_crashed(cfg, tmp_path)
    run_loop(cfg, tmp_path / "resumed", show=False)
    run_loop(cfg, tmp_path / "alone", show=False, only=[(1, 1)])
    for seed in (0, 1):
        a = read_metrics(tmp_path / "whole" / f"seed_{seed:03d}" / "metrics.jsonl")
        b = read_metrics(tmp_path / "resumed" / f"seed_{seed:03d}" / "metrics.jsonl")
        assert len(a) == 9 and a == b
        for arm in ("replace-random", "replace-greedy-k2", "accumulate-random"):
            for t in (1, 2):
                where = f"seed_{seed:03d}/arms/{arm}/iter_{t:03d}"
                runs = ("whole", "resumed") + (("alone",) if (seed, arm) == (1, "replace-greedy-k2") else ())
                files = [(tmp_path / r / where / "model.safetensors").read_bytes() for r in runs]
                assert all(f == files[0] for f in files)
                with np.load(tmp_path / runs[0] / where / "samples.npz") as za:
                    for r in runs[1:]:
                        with np.load(tmp_path / r / where / "samples.npz") as zb:
                            np.testing.assert_array_equal(za["images"], zb["images"])
    timings = json.loads((tmp_path / "whole" / "seed_000" / "arms" / "replace-random" / "iter_001"
                          / "timings.json").read_text())
    assert timings["trained_together"] == 6


def test_models_trained_together_on_two_workers(tmp_path):
    """batch_models with workers = 2 (how the presets run on two cores): iteration 0 of each seed in a worker, then
    two groups of two slices in two workers; every stage is there, each model trained beside another, the rows in
    (iteration, arm) order; and the settings that cannot apply to models trained together are refused."""
    cfg = tiny_cfg("seeds=[0,1]", "batch_models=true", "workers=2", "iterations=2")
    summary = run_loop(cfg, tmp_path / "r", show=False)
    assert summary["claims"]
    for seed in (0, 1):
        rows = read_metrics(tmp_path / "r" / f"seed_{seed:03d}" / "metrics.jsonl")
        assert [(r["iteration"], r["arm"]) for r in rows] == [(t, a.label()) for t in range(2) for a in cfg.arms]
        for arm in cfg.arms:
            timings = json.loads((tmp_path / "r" / f"seed_{seed:03d}" / "arms" / arm.label() / "iter_001"
                                  / "timings.json").read_text())
            assert timings["trained_together"] == 2 and timings["train_s"] * 2 == pytest.approx(timings["train_batch_s"])
    for bad in (["mixed_precision=fp16"], ["compile=true", "device=cuda"], ["channels_last=true"]):
        with pytest.raises(UserError, match="batch_models"):
            tiny_cfg("batch_models=true", *bad)
