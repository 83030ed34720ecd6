"""Command-line behaviour: results on stdout, one-line errors with exit status 2, nothing half-written."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import bad_image_inputs

from model_collapse.cli import main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc, err, pattern):
    assert rc == 2
    lines = [l for l in err.strip().splitlines() if l]
    assert len(lines) == 1 and lines[0].startswith("model-collapse: error:"), err
    assert "Traceback" not in err
    assert re.search(pattern, lines[0], re.IGNORECASE), lines[0]


def test_run_bad_data_leaves_no_run_dir(capsys, tmp_path):
    for name, (path, pattern) in bad_image_inputs(tmp_path).items():
        out = tmp_path / f"run-{name}"
        rc, stdout, err = run_cli(capsys, "run", "smoke", "--set", f"data={json.dumps(path)}", "--out", str(out))
        assert_user_error(rc, err, pattern)
        assert not out.exists(), name


@pytest.mark.parametrize("overrides, pattern", [
    (["n_train=0"], "n_train must be > 0"),
    (["n_train=-3"], "n_train must be > 0"),
    (["n_train=5000"], "larger than the data"),
    (["arms.0.pool_factor=0.5"], "pool_factor must be >= 1"),
    (["arms.0.paradigm=\"recycle\""], "unknown paradigm"),
    (["arms.1.selector=\"best\""], "unknown selector"),
    (["no_such_key=1"], "unknown config key"),
    (["n_train=\"many\""], "not a valid int"),
    (["model=\"unet32\""], "not divisible"),
    (["norm_groups=5"], "does not divide"),
    (["spaces=[\"nowhere\"]"], "unknown space"),
    (["sampler=\"magic\""], "unknown sampler"),
])
def test_run_bad_config(capsys, tmp_path, overrides, pattern):
    out = tmp_path / "run"
    argv = ["run", "smoke", "--out", str(out)]
    for o in overrides:
        argv += ["--set", o]
    rc, _, err = run_cli(capsys, *argv)
    assert_user_error(rc, err, pattern)
    assert not out.exists()


def test_run_unknown_preset_and_missing_config(capsys, tmp_path):
    rc, _, err = run_cli(capsys, "run", "nonesuch", "--out", str(tmp_path / "r"))
    assert_user_error(rc, err, "unknown preset")
    rc, _, err = run_cli(capsys, "run", str(tmp_path / "x.toml"), "--out", str(tmp_path / "r"))
    assert_user_error(rc, err, "no such config file")
    bad = tmp_path / "bad.toml"
    bad.write_text("n_train = [\n")
    rc, _, err = run_cli(capsys, "run", str(bad), "--out", str(tmp_path / "r"))
    assert_user_error(rc, err, "invalid TOML")
    assert not (tmp_path / "r").exists()


def test_dry_run_prints_resolved_config(capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "run", "smoke", "--set", "n_train=20", "--set", "arms.1.pool_factor=3",
                         "--dry-run", "--out", str(tmp_path / "r"))
    assert rc == 0
    cfg = json.loads(out)
    assert cfg["n_train"] == 20 and cfg["arms"][1]["pool_factor"] == 3.0
    assert not (tmp_path / "r").exists()


def test_config_file_with_arms(capsys, tmp_path):
    f = tmp_path / "study.toml"
    f.write_text('n_train = 16\niterations = 3\n[[arms]]\nparadigm = "accumulate"\nselector = "threshold"\n'
                 'pool_factor = 2\n[[arms]]\nparadigm = "fresh"\nfresh_fraction = 0.25\n')
    rc, out, _ = run_cli(capsys, "run", str(f), "--dry-run")
    cfg = json.loads(out)
    assert [a["paradigm"] for a in cfg["arms"]] == ["accumulate", "fresh"]
    assert cfg["arms"][1]["fresh_fraction"] == 0.25


@pytest.fixture
def pool_npz(tmp_path, rng):
    images = rng.integers(0, 256, size=(60, 8, 8), dtype=np.uint8)
    labels = np.repeat(np.arange(3), 20)
    p = tmp_path / "pool.npz"
    np.savez(p, images=images, labels=labels)
    return p, images, labels


def test_select_writes_images_indices_and_parameters(capsys, tmp_path, pool_npz):
    p, images, labels = pool_npz
    for method in ("greedy", "threshold", "random"):
        out = tmp_path / f"sel-{method}.npz"
        rc, stdout, err = run_cli(capsys, "select", str(p), "--n", "12", "--method", method, "--seed", "4",
                                  "--out", str(out), "--json")
        assert rc == 0, err
        res = json.loads(stdout)
        assert res["n"] == 12 and res["method"] == method
        with np.load(out, allow_pickle=False) as z:
            idx = z["indices"]
            np.testing.assert_array_equal(z["images"], images[idx][..., None])
            np.testing.assert_array_equal(z["labels"], labels[idx])
            assert str(z["method"]) == method and int(z["seed"]) == 4
            if method == "threshold":
                assert float(z["tau0"]) > 0 and float(z["decay"]) == 0.95 and len(z["order"]) == 60


def test_select_with_a_reference(capsys, tmp_path, pool_npz):
    from model_collapse.data import pixel_vectors
    from model_collapse.selection import select

    p, images, labels = pool_npz
    ref = tmp_path / "ref.npz"
    np.savez(ref, images=images[:30], labels=labels[:30])
    for method in ("gated", "herding"):
        out = tmp_path / f"sel-{method}.npz"
        rc, stdout, err = run_cli(capsys, "select", str(p), "--n", "10", "--method", method, "--reference",
                                  str(ref), "--out", str(out), "--json")
        assert rc == 0, err
        with np.load(out, allow_pickle=False) as z:
            expect = select(pixel_vectors(images[..., None]), 10, method, 0,
                            reference=pixel_vectors(images[:30][..., None])).indices
            np.testing.assert_array_equal(z["indices"], expect)
        rc, _, err = run_cli(capsys, "select", str(p), "--n", "10", "--method", method, "--out", str(out))
        assert rc == 2 and "needs --reference" in err and len(err.strip().splitlines()) == 1


def test_select_per_class(capsys, tmp_path, pool_npz):
    p, images, labels = pool_npz
    out = tmp_path / "pc.npz"
    rc, _, err = run_cli(capsys, "select", str(p), "--n", "9", "--per-class", "--out", str(out))
    assert rc == 0, err
    with np.load(out) as z:
        assert np.bincount(z["labels"]).tolist() == [3, 3, 3]


@pytest.mark.parametrize("extra, pattern", [
    (["--n", "100"], "fewer than"),
    (["--n", "0"], "must be > 0"),
    (["--n", "5", "--method", "best"], "unknown selection method"),
    (["--n", "5", "--space", "nowhere"], "unknown space"),
    (["--n", "5", "--method", "threshold", "--decay", "1.2"], "decay"),
    (["--n", "5", "--method", "threshold", "--tau0", "0"], "tau0"),
])
def test_select_bad_input(capsys, tmp_path, pool_npz, extra, pattern):
    p, _, _ = pool_npz
    out = tmp_path / "o.npz"
    rc, _, err = run_cli(capsys, "select", str(p), *extra, "--out", str(out))
    assert_user_error(rc, err, pattern)
    assert not out.exists()


def test_entropy_and_score_commands(capsys, tmp_path, rng):
    train = rng.integers(0, 256, size=(50, 6, 6), dtype=np.uint8)
    gen = np.concatenate([train[:10], rng.integers(0, 256, size=(10, 6, 6), dtype=np.uint8)])
    np.save(tmp_path / "train.npy", np.concatenate([train, train[:5]]))
    np.save(tmp_path / "gen.npy", gen)
    rc, out, _ = run_cli(capsys, "entropy", str(tmp_path / "train.npy"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["duplicates"] == 5 and res["n"] == 50 and res["dim"] == 36 and res["k"] == 1
    rc, out, _ = run_cli(capsys, "score", str(tmp_path / "gen.npy"), "--train", str(tmp_path / "train.npy"), "--json")
    res = json.loads(out)
    assert rc == 0 and res["mem_fraction"] == pytest.approx(0.5) and res["gen_score"] > 0
    np.save(tmp_path / "other.npy", rng.integers(0, 256, size=(10, 5, 5), dtype=np.uint8))
    rc, _, err = run_cli(capsys, "score", str(tmp_path / "other.npy"), "--train", str(tmp_path / "train.npy"))
    assert_user_error(rc, err, "generated images are")
    rc, _, err = run_cli(capsys, "entropy", str(tmp_path / "missing"))
    assert_user_error(rc, err, "no such file")
    rc, _, err = run_cli(capsys, "entropy", str(tmp_path / "train.npy"), "--space", "nowhere")
    assert_user_error(rc, err, "unknown space")


def test_real_process_exit_status_and_no_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "model_collapse", "entropy", str(tmp_path / "none.npy")],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_every_shipped_preset_resolves():
    from model_collapse.config import preset_names, resolve_config

    names = preset_names()
    assert {"demo", "smoke", "guided", "cifar10-replace", "cifar10-accumulate", "cifar10-guided", "ffhq32"} <= set(names)
    for name in names:
        cfg = resolve_config(name)
        assert cfg.iterations >= 2 and len(cfg.arms) >= 2, name


def test_long_commands_show_progress_on_stderr_and_quiet_hides_it(capsys, tmp_path, pool_npz, monkeypatch):
    from model_collapse import cli

    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)  # show bars at once instead of after two seconds
    p, _, _ = pool_npz
    for method, stage in (("greedy", "greedy selection, 12 of 60"), ("threshold", "threshold selection, 12 of 60")):
        rc, stdout, err = run_cli(capsys, "select", str(p), "--n", "12", "--method", method,
                                  "--out", str(tmp_path / f"{method}.npz"), "--json")
        assert rc == 0 and stage in err, err
        json.loads(stdout)  # bars never reach stdout
    rc, stdout, err = run_cli(capsys, "entropy", str(p), "--json")
    assert rc == 0 and "nearest neighbours, 60 x 60" in err, err
    rc, stdout, err = run_cli(capsys, "select", str(p), "--n", "12", "--out", str(tmp_path / "q.npz"), "--quiet")
    assert rc == 0 and err == ""


def test_standalone_commands_reject_every_bad_input_in_one_line(capsys, tmp_path, pool_npz):
    good, _, _ = pool_npz
    for name, (path, pattern) in bad_image_inputs(tmp_path).items():
        out = tmp_path / f"sel-{name}.npz"
        for argv in (["entropy", path], ["select", path, "--n", "2", "--out", str(out)],
                     ["score", path, "--train", str(good)], ["score", str(good), "--train", path],
                     ["fid", path, "--ref", str(good)]):
            rc, stdout, err = run_cli(capsys, *argv)
            assert_user_error(rc, err, pattern)
            assert stdout == "" and not out.exists(), (name, argv)


def test_float64_products_give_the_same_answers(capsys, tmp_path, rng):
    x = rng.integers(0, 256, size=(80, 6, 6), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "g.npy", np.concatenate([x[:10], rng.integers(0, 256, size=(30, 6, 6), dtype=np.uint8)]))
    x_path, g_path = str(tmp_path / "x.npy"), str(tmp_path / "g.npy")
    for argv in (["entropy", x_path], ["score", g_path, "--train", x_path]):
        outs = []
        for prec in ("float32", "float64"):
            rc, out, err = run_cli(capsys, *argv, "--precision", prec, "--json")
            assert rc == 0, err
            outs.append(json.loads(out))
        assert outs[0] == outs[1]
    rc, _, err = run_cli(capsys, "entropy", str(tmp_path / "x.npy"), "--precision", "float16")
    assert_user_error(rc, err, "precision")


def test_pixel_greedy_breaks_exact_ties_by_the_lowest_index(capsys, tmp_path):
    """Issue 16's pool: uint8 6x6 images with values in {0, 60, 120, 180} and 300 exact duplicates; every pick
    must be the lowest-index point among those exactly as far (in 0-255 units, exact in float64)."""
    from test_selection import greedy_reference

    rng = np.random.default_rng(16)
    images = (rng.integers(0, 4, size=(1800, 6, 6, 1)) * 60).astype(np.uint8)
    images[1500:] = images[:300]
    p = tmp_path / "pool.npz"
    np.savez(p, images=images)
    out = tmp_path / "sel.npz"
    rc, _, err = run_cli(capsys, "select", str(p), "--n", "400", "--method", "greedy", "--seed", "3",
                         "--out", str(out))
    assert rc == 0, err
    with np.load(out, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["indices"], greedy_reference(images.reshape(1800, -1), 400, 3))


def test_damaged_run_directories_give_one_line_errors(capsys, tmp_path):
    """A garbage line in the middle of metrics.jsonl is refused with its number (reading on would drop an arm, and
    a run would append duplicates); a config.json that is not an object, or not UTF-8, is refused in one line."""
    from test_loop import TINY

    out = tmp_path / "run"
    sets = [a for o in TINY for a in ("--set", o)]
    rc, _, err = run_cli(capsys, "run", "smoke", "--out", str(out), "--quiet", *sets)
    assert rc == 0, err
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:1] + ["{garbage\n"] + lines[1:]))
    for argv in (["run", "smoke", "--out", str(out), "--quiet", *sets], ["report", str(out)]):
        rc, _, err = run_cli(capsys, *argv)
        assert_user_error(rc, err, r"metrics.jsonl: line 2 is not a metrics row")
    for bad in (b"[1, 2, 3]", b"\xff\xfe not utf-8"):
        (out / "config.json").write_bytes(bad)
        for argv in (["run", "smoke", "--out", str(out), "--quiet", *sets], ["report", str(out)]):
            rc, _, err = run_cli(capsys, *argv)
            assert_user_error(rc, err, r"config.json")


@pytest.mark.parametrize("overrides, pattern", [
    (["image_size=0"], "image_size must be a positive side"),
    (["image_size=-8"], "image_size must be a positive side"),
    (["channels=[16, 0, 32]"], "channels must be positive widths"),
    (["device=\"gpu7\""], "device must be cpu, cuda"),
    (["n_train=1"], "n_train must be >= 2"),
    (["sample_steps=5000"], "sample_steps must lie in"),
    (["log_with=\"wandb\""], "needs the wandb package"),
    (["arms.1.per_class=true"], "per_class needs conditional = true"),
    (["seed=18446744073709551616"], "seed must lie in"),
    (["log_with=\"mlflow\""], "log_with must be tensorboard or wandb"),
    (["arms=[{paradigm=\"fresh\", selector=\"random\", fresh_fraction=1.0}]"], "fresh_fraction must lie in"),
])
def test_run_refuses_bad_values_before_anything_is_written(capsys, tmp_path, overrides, pattern):
    """Values that used to fail only after training (or never), refused up front, also under --dry-run."""
    out = tmp_path / "run"
    for dry in ([], ["--dry-run"]):
        rc, _, err = run_cli(capsys, "run", "smoke", "--out", str(out), *dry,
                             *[a for o in overrides for a in ("--set", o)])
        assert_user_error(rc, err, pattern)
        assert not out.exists()


def test_bad_inputs_and_outputs_refused_before_any_work(capsys, tmp_path, pool_npz):
    """Issue 16's attack, the kinds it found: a header promising terabytes, a FIFO (reading it would block), a
    16-bit PNG (no longer clipped into identical images), outputs into a missing folder or onto a folder."""
    import os

    import numpy.lib.format as npf
    from PIL import Image

    p, _, _ = pool_npz
    huge = tmp_path / "huge.npy"
    with open(huge, "wb") as f:
        npf.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (7 * 10**12, 8, 8, 1)})
        f.write(b"\0" * 64)
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    for bad, pattern in ((huge, "header promises"), (fifo, "not a regular file")):
        for argv in (["select", str(bad), "--n", "2", "--out", str(tmp_path / "s.npz")], ["entropy", str(bad)]):
            rc, _, err = run_cli(capsys, *argv)
            assert_user_error(rc, err, pattern)
    folder = tmp_path / "folder.npz"
    folder.mkdir()
    for out, pattern in ((tmp_path / "missing" / "sel.npz", "does not exist"), (folder, "is a directory")):
        rc, _, err = run_cli(capsys, "select", str(p), "--n", "5", "--out", str(out))
        assert_user_error(rc, err, pattern)
    assert not (tmp_path / "missing").exists() and not list(tmp_path.glob("*.tmp*"))
    rc, _, err = run_cli(capsys, "report", str(tmp_path), "--out", str(tmp_path))
    assert rc == 2 and "Traceback" not in err
    deep = tmp_path / "deep"
    deep.mkdir()
    for i in range(3):
        Image.fromarray((np.arange(64).reshape(8, 8) * 1000 + i * 300).astype(np.uint16)).save(deep / f"{i}.png")
    from model_collapse.data import load_images

    images = load_images(str(deep)).images
    assert len(np.unique(images.reshape(3, -1), axis=0)) == 3 and images.max() > 200


def test_feature_arrays_go_straight_to_the_kernels(capsys, tmp_path, rng):
    """A (N, D) float .npy (memory-mapped) or an .npz with `features`: select, entropy, score and fid use the
    vectors as given; the selection equals the library's on the same array; bad arrays give one line."""
    from test_selection import greedy_reference

    from model_collapse.metrics import kl_entropy

    emb = rng.normal(size=(300, 24)).astype(np.float32)
    npy, npz = tmp_path / "emb.npy", tmp_path / "emb.npz"
    np.save(npy, emb)
    np.savez(npz, features=emb[:200], labels=np.arange(200) % 4)
    rc, stdout, err = run_cli(capsys, "select", str(npy), "--n", "40", "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    assert res["space"] == "given" and res["indices"] == greedy_reference(emb, 40, 0).tolist()
    out = tmp_path / "sel.npz"
    rc, _, err = run_cli(capsys, "select", str(npz), "--n", "20", "--method", "threshold", "--per-class",
                         "--out", str(out))
    assert rc == 0, err
    with np.load(out, allow_pickle=False) as z:
        assert "images" not in z.files and len(z["indices"]) == 20 and str(z["space"]) == "given"
        np.testing.assert_array_equal(np.bincount(z["labels"]), [5, 5, 5, 5])
    rc, stdout, err = run_cli(capsys, "entropy", str(npy), "--json")
    assert rc == 0, err
    assert json.loads(stdout)["entropy"] == pytest.approx(kl_entropy(emb, 1).entropy, rel=1e-12)
    for cmd in (["score", str(npz), "--train", str(npy)], ["fid", str(npz), "--ref", str(npy)]):
        rc, stdout, err = run_cli(capsys, *cmd, "--json")
        assert rc == 0 and json.loads(stdout)["space"] == "given", err
    bad = {"nan": emb.copy(), "rank": emb[:, :, None].astype(np.float64), "int": emb.astype(np.int32)}
    bad["nan"][7, 3] = np.nan
    patterns = {"nan": "row 7 contains NaN", "rank": "images must", "int": "must hold floats"}
    for name, arr in bad.items():
        np.save(tmp_path / f"{name}.npy", arr)
        rc, _, err = run_cli(capsys, "select", str(tmp_path / f"{name}.npy"), "--n", "5", "--json")
        assert_user_error(rc, err, patterns[name])
    np.save(tmp_path / "d10.npy", emb[:, :10])
    rc, _, err = run_cli(capsys, "score", str(npy), "--train", str(tmp_path / "d10.npy"))
    assert_user_error(rc, err, "D = 24 but the training features have D = 10")
    images = tmp_path / "images.npz"
    np.savez(images, images=rng.integers(0, 256, size=(30, 6, 6, 1)).astype(np.uint8))
    rc, _, err = run_cli(capsys, "score", str(npy), "--train", str(images))
    assert_user_error(rc, err, "generated set is a feature array but the training set is images")
    rc, _, err = run_cli(capsys, "select", str(images), "--n", "5")
    assert_user_error(rc, err, "--out is needed for an image pool")


def test_a_path_the_file_system_refuses_gives_one_line(capsys, tmp_path):
    for argv in (["entropy", str(tmp_path / ("a" * 300 + ".npy"))],
                 ["select", str(tmp_path / ("b" * 300 + ".npz")), "--n", "3", "--json"]):
        rc, _, err = run_cli(capsys, *argv)
        assert_user_error(rc, err, "too long")


def test_set_values_keep_their_field_types():
    """--set: a text field takes the text as written, a list field a TOML list, comma items or one item; a TOML
    file must give each field its own type (a list as a list, text as text)."""
    from model_collapse.config import apply_overrides, resolve_config
    from model_collapse.errors import UserError

    d = apply_overrides({}, ['spaces="pixel"', "seeds=0,1", "arms.0.name=123", "data_root=5", "attention_levels=[2]"])
    assert d["spaces"] == ["pixel"] and d["seeds"] == [0, 1] and d["arms"][0]["name"] == "123"
    assert d["data_root"] == "5" and d["attention_levels"] == [2]
    assert resolve_config("smoke", ["seeds=3", "spaces=pixel,domain"]).seeds == (3,)
    for bad, match in {"seeds=0,,1": "an empty item", "seeds=a,b": "list of integers", "seeds=[1.5]": "list of integers",
                       "iterations=true": "integer"}.items():
        with pytest.raises(UserError, match=match):
            resolve_config("smoke", [bad])
