import subprocess
import sys

from model_collapse.probe import resolve_probe, run_probe


def test_probe_runs_resumes_and_draws(tmp_path):
    cfg = resolve_probe("digits", "8,16", "10,20", ["n_eval=16", "sample_steps=3", "batch_size=8", "workers=1"])
    res = run_probe(cfg, tmp_path / "p", show=False)
    assert [(r["size"], r["steps"]) for r in res["rows"]] == [(8, 10), (8, 20), (16, 10), (16, 20)]
    for r in res["rows"]:
        assert 0 <= r["mem_fraction"] <= 1 and r["gen_score_ratio"] > 0 and r["fd_heldout"] > 0
    assert (tmp_path / "p" / "figures" / "probe.png").stat().st_size > 1000
    # resume: drop one result and its successor, rerun: the same rows come back
    (tmp_path / "p" / "size_00016" / "steps_0000020.json").unlink()
    again = run_probe(cfg, tmp_path / "p", show=False)
    assert again["rows"] == res["rows"]


def test_probe_rejects_bad_sizes(tmp_path):
    p = subprocess.run([sys.executable, "-m", "model_collapse", "probe", "digits", "--sizes", "1700",
                        "--out", str(tmp_path / "p")], capture_output=True, text=True)
    assert p.returncode == 2 and "held-out" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "model_collapse", "probe", "--steps", "ten"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "comma-separated integers" in p.stderr
