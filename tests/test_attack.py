"""The project's own attack list (issue 16): a few hundred bad inputs across all seven commands, each of which must
keep the promise: exit status 2, one line on stderr starting `model-collapse: error:`, no traceback, nothing on
stdout, and nothing written (no output file, no run directory, no temporary file). Grow the list when a new kind
of bad input turns up; every entry runs in-process, in milliseconds, before any training or kNN work."""

import json
import os
import struct
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import bad_image_inputs

from model_collapse.cli import main
from model_collapse.config import config_to_dict, resolve_config


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height pixels (a decompression bomb's signature), with no real data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _bad_files(d):
    """{name: path} of bad image inputs: conftest's kinds and more of each kind the issue lists."""
    files = {name: path for name, (path, _) in bad_image_inputs(d).items()}
    import numpy.lib.format as npf

    def header_only(name, shape, descr="|u1", data=b""):
        with open(d / name, "wb") as f:
            npf.write_array_header_1_0(f, {"descr": descr, "fortran_order": False, "shape": shape})
            f.write(data)
        return str(d / name)

    files["58 TiB header"] = header_only("huge.npy", (7 * 10**12, 8, 8, 1), data=b"\0" * 64)
    files["truncated data"] = header_only("short.npy", (16, 8, 8), data=b"\0" * 100)
    files["negative shape"] = header_only("neg.npy", (-4, 8, 8), data=b"\0" * 64)
    for name, arr in {
        "complex": np.zeros((4, 8, 8), np.complex64),
        "strings": np.array([["ab"] * 8] * 8 * 4).reshape(4, 8, 8),
        "bool": np.zeros((4, 8, 8), bool),
        "five dims": np.zeros((2, 2, 4, 4, 3), np.uint8),
        "one dim": np.zeros(64, np.uint8),
        "scalar": np.array(3, np.uint8),
        "zero-size images": np.zeros((4, 0, 0), np.uint8),
        "negative floats": np.full((4, 8, 8), -0.5, np.float32),
        "float16 over range": np.full((4, 8, 8), 7.0, np.float16),
        "int8": np.zeros((4, 8, 8), np.int8),
        "unsigned 64": np.zeros((4, 8, 8), np.uint64),
        "structured": np.zeros((4, 8), dtype=[("a", "u1"), ("b", "f4")]),
    }.items():
        np.save(d / f"{name}.npy", arr)
        files[name] = str(d / f"{name}.npy")
    (d / "not-a-zip.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    files["not a zip"] = str(d / "not-a-zip.npz")
    np.savez(d / "crc.npz", images=np.arange(4 * 64, dtype=np.uint8).reshape(4, 8, 8))
    raw = bytearray((d / "crc.npz").read_bytes())
    raw[len(raw) // 3] ^= 0xFF  # inside the stored member: its CRC no longer matches
    (d / "crc-bad.npz").write_bytes(bytes(raw))
    files["npz member damaged"] = str(d / "crc-bad.npz")
    with zipfile.ZipFile(d / "deflate-bomb.npz", "w", zipfile.ZIP_DEFLATED) as z:
        with z.open("images.npy", "w", force_zip64=True) as f:
            npf.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (10**12, 8, 8)})
            f.write(b"\0" * 4096)
    files["npz header promising terabytes"] = str(d / "deflate-bomb.npz")
    np.savez(d / "labels-short.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.arange(3))
    files["labels of another length"] = str(d / "labels-short.npz")
    np.savez(d / "labels-2d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros((4, 2), np.int64))
    files["labels with two columns"] = str(d / "labels-2d.npz")
    np.savez(d / "labels-text.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array(["a"] * 4))
    files["labels that are text"] = str(d / "labels-text.npz")
    np.savez(d / "labels-neg.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, -1, 2, 1]))
    files["negative labels"] = str(d / "labels-neg.npz")
    np.savez(d / "images-obj.npz", images=np.array([None] * 4, dtype=object), allow_pickle=True)
    files["pickled npz member"] = str(d / "images-obj.npz")
    os.mkfifo(d / "fifo.npy")
    files["FIFO"] = str(d / "fifo.npy")
    (d / "folder.npy").mkdir()
    files["folder named .npy"] = str(d / "folder.npy")
    (d / "notes.txt").write_text("not images\n")
    files["text file"] = str(d / "notes.txt")
    (d / "texts").mkdir()
    (d / "texts" / "a.txt").write_text("x")
    files["folder of text files"] = str(d / "texts")
    bomb = d / "bomb"
    bomb.mkdir()
    _png_header_only(bomb / "a.png", 60000, 60000)
    files["decompression bomb"] = str(bomb)
    zero = d / "zero-byte-png"
    zero.mkdir()
    (zero / "a.png").write_bytes(b"")
    files["zero-byte PNG"] = str(zero)
    classes = d / "classes-mixed"
    (classes / "0").mkdir(parents=True)
    (classes / "1").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(classes / "0" / "a.png")
    Image.fromarray(np.zeros((6, 6), np.uint8)).save(classes / "1" / "b.png")
    files["class folders of mixed sizes"] = str(classes)
    files["unknown data set"] = "imagenet-not-here"
    files["cifar10 without data_root"] = "cifar10"
    files["too long a name"] = str(d / ("x" * 300 + ".npy"))
    files["empty path"] = ""
    return files


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    d = tmp_path_factory.mktemp("attack")
    rng = np.random.default_rng(0)
    good = d / "good.npz"
    np.savez(good, images=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), labels=np.arange(40) % 4)
    return d, str(good), _bad_files(d)


# positions that take an image set: (command builder) -> argv, with GOOD the valid set and OUT an output path
POSITIONS = {
    "entropy": lambda bad, good, out: ["entropy", bad],
    "select pool": lambda bad, good, out: ["select", bad, "--n", "2", "--out", out],
    "select reference": lambda bad, good, out: ["select", good, "--n", "2", "--method", "gated", "--reference",
                                                bad, "--out", out],
    "score generated": lambda bad, good, out: ["score", bad, "--train", good],
    "score train": lambda bad, good, out: ["score", good, "--train", bad],
    "fid generated": lambda bad, good, out: ["fid", bad, "--ref", good],
    "fid ref": lambda bad, good, out: ["fid", good, "--ref", bad],
    "probe data": lambda bad, good, out: ["probe", bad, "--sizes", "4", "--steps", "2", "--out", out],
}

FILE_KINDS = ["missing", "empty folder", "mixed sizes", "corrupt", "rank", "dtype", "nan", "inf", "range",
              "garbage", "pickled", "no images key", "empty file", "zero images", "58 TiB header",
              "truncated data", "negative shape", "complex", "strings", "bool", "five dims", "one dim", "scalar",
              "zero-size images", "negative floats", "float16 over range", "int8", "unsigned 64", "structured",
              "not a zip", "npz member damaged", "npz header promising terabytes", "labels of another length",
              "labels with two columns", "labels that are text", "negative labels", "pickled npz member", "FIFO",
              "folder named .npy", "text file", "folder of text files", "decompression bomb", "zero-byte PNG",
              "class folders of mixed sizes", "unknown data set", "cifar10 without data_root", "too long a name",
              "empty path"]


def _options_attack(good, out, d):
    """(name, argv) of bad options and outputs, every command."""
    cases = []
    sel = lambda *a: ["select", good, *a]
    for name, extra in {
        "n zero": ["--n", "0"], "n negative": ["--n", "-3"], "n not a number": ["--n", "many"],
        "n beyond the pool": ["--n", "41"], "n missing": [], "method unknown": ["--n", "4", "--method", "best"],
        "seed negative": ["--n", "4", "--seed", "-1"], "seed beyond 64 bits": ["--n", "4", "--seed", str(2**64)],
        "tau0 zero": ["--n", "4", "--method", "threshold", "--tau0", "0"],
        "tau0 negative": ["--n", "4", "--method", "threshold", "--tau0", "-1"],
        "tau0 nan": ["--n", "4", "--method", "threshold", "--tau0", "nan"],
        "tau0 inf": ["--n", "4", "--method", "threshold", "--tau0", "inf"],
        "decay zero": ["--n", "4", "--method", "threshold", "--decay", "0"],
        "decay one": ["--n", "4", "--method", "threshold", "--decay", "1"],
        "decay above one": ["--n", "4", "--method", "threshold", "--decay", "1.5"],
        "decay nan": ["--n", "4", "--method", "threshold", "--decay", "nan"],
        "decay-when unknown": ["--n", "4", "--decay-when", "sometimes"],
        "space unknown": ["--n", "4", "--space", "nowhere"],
        "space without weights": ["--n", "4", "--space", "dinov2-small", "--feature-dir", str(d / "no-weights")],
        "gated without reference": ["--n", "4", "--method", "gated"],
        "herding without reference": ["--n", "4", "--method", "herding"],
        "capped without reference": ["--n", "4", "--method", "capped"],
        "reference of another size": ["--n", "4", "--method", "herding", "--reference", "digits"],
        "out into a missing folder": ["--n", "4", "--out", str(d / "missing" / "o.npz")],
        "out onto a folder": ["--n", "4", "--out", str(d)],
        "out with another extension": ["--n", "4", "--out", str(d / "o.txt")],
        "images without out": ["--n", "4"],
        "unknown option": ["--n", "4", "--fast"],
        "precision unknown": ["--n", "4", "--precision", "float8"],
    }.items():
        cases.append((f"select: {name}", sel(*extra) + (["--out", out] if "--out" not in extra
                                                        and name not in ("images without out",) else [])))
    for name, extra in {"k zero": ["--k", "0"], "k negative": ["--k", "-1"], "k beyond the set": ["--k", "40"],
                        "k not a number": ["--k", "one"], "space unknown": ["--space", "nowhere"]}.items():
        cases.append((f"entropy: {name}", ["entropy", good, *extra]))
    # weights that are garbage: a DINOv2 folder, an Inception file, a UNet to start from
    garbage = d / "garbage-weights"
    for sub in ("dinov2-small", "dinov2-base"):
        (garbage / sub).mkdir(parents=True, exist_ok=True)
    (garbage / "dinov2-small" / "config.json").write_text("{not json")
    (garbage / "dinov2-base" / "config.json").write_text('{"model_type": "dinov2", "hidden_size": 768}')
    (garbage / "dinov2-base" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    (garbage / "inception.safetensors").write_bytes(b"\xff" * 64)
    unet = d / "garbage-unet"
    unet.mkdir(exist_ok=True)
    (unet / "config.json").write_text('{"_class_name": "UNet2DModel", "sample_size": 8}')
    (unet / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    for space in ("dinov2-small", "dinov2-base", "inception"):
        cases.append((f"entropy: garbage {space} weights", ["entropy", good, "--space", space, "--feature-dir",
                                                            str(garbage)]))
        cases.append((f"select: garbage {space} weights", ["select", good, "--n", "4", "--space", space,
                                                           "--feature-dir", str(garbage), "--out", out]))
    cases.append(("run: init_from garbage weights", ["run", "smoke", "--out", out, "--set",
                                                     f"init_from=\"{unet}\""]))
    cases += [("score: no --train", ["score", good]),
              ("score: space unknown", ["score", good, "--train", good, "--space", "x"]),
              ("fid: no --ref", ["fid", good]), ("fid: seed negative", ["fid", good, "--ref", good, "--seed", "-2"]),
              ("fid: space unknown", ["fid", good, "--ref", good, "--space", "x"]),
              ("fid: inception without weights", ["fid", good, "--ref", good, "--space", "inception",
                                                  "--feature-dir", str(d / "no-weights")])]
    probe = lambda *a: ["probe", good, "--out", out, *a]
    for name, extra in {"sizes not numbers": ["--sizes", "a,b"], "sizes zero": ["--sizes", "0"],
                        "sizes negative": ["--sizes", "-4"], "sizes beyond the data": ["--sizes", "4000"],
                        "sizes empty": ["--sizes", ""], "steps zero": ["--steps", "0"],
                        "steps not numbers": ["--steps", "x"], "steps negative": ["--steps", "-5"],
                        "bad --set": ["--sizes", "4", "--steps", "2", "--set", "no_such_key=1"],
                        "--set without =": ["--sizes", "4", "--steps", "2", "--set", "train_steps"]}.items():
        cases.append((f"probe: {name}", probe(*extra)))
    cases.append(("probe: out is a file", ["probe", good, "--sizes", "4", "--steps", "2", "--out", good]))
    for name, extra in {"steps beyond 64 bits": ["--steps", "99999999999999999999999"],
                        "an empty item in steps": ["--steps", "2,,3"],
                        "lr nan": ["--steps", "2", "--set", "lr=nan"],
                        "n_eval zero": ["--steps", "2", "--set", "n_eval=0"],
                        "batch_size zero": ["--steps", "2", "--set", "batch_size=0"],
                        "seed negative": ["--steps", "2", "--set", "seed=-1"]}.items():
        cases.append((f"probe: {name}", ["probe", "digits", "--sizes", "4", *extra, "--out", out]))
    run = lambda *a: ["run", "smoke", "--out", out, *a]
    for name, extra in {
        "--set without =": ["--set", "n_train"], "--set with empty key": ["--set", "=5"],
        "--set bad TOML": ["--set", "n_train=["], "--set unknown key": ["--set", "colour=1"],
        "--set wrong type": ["--set", "iterations=\"two\""], "iterations zero": ["--set", "iterations=0"],
        "iterations negative": ["--set", "iterations=-1"], "train_steps zero": ["--set", "train_steps=0"],
        "batch_size zero": ["--set", "batch_size=0"], "lr negative": ["--set", "lr=-1.0"],
        "lr nan": ["--set", "lr=nan"], "arms empty": ["--set", "arms=[]"], "seeds empty": ["--set", "seeds=[]"],
        "seeds repeated": ["--set", "seeds=[1, 1]"], "seeds negative": ["--set", "seeds=[-1]"],
        "n_eval zero": ["--set", "n_eval=0"], "workers zero": ["--set", "workers=0"],
        "pool_factor nan": ["--set", "arms.0.pool_factor=nan"], "arm index beyond": ["--set", "arms.9.selector=\"greedy\""],
        "quality metric unknown": ["--set", "quality_metric=\"beauty\""], "data unknown": ["--set", "data=\"imagenet\""],
        "model unknown": ["--set", "model=\"huge\""], "sampler unknown": ["--set", "sampler=\"magic\""],
        "mixed precision unknown": ["--set", "mixed_precision=\"fp8\""],
        "only not a seed": ["--only", "x"], "only a seed not in the run": ["--only", "99"],
        "only an unknown arm": ["--only", "0/nope"], "only a slice beyond": ["--only", "@99"],
        "image_size zero": ["--set", "image_size=0"], "device unknown": ["--set", "device=\"gpu7\""],
        "init_from missing": ["--set", f"init_from=\"{d / 'no-model'}\""],
    }.items():
        cases.append((f"run: {name}", run(*extra)))
    # a fresh attack's findings (fifth session): outputs onto devices and FIFOs, arm names that leave the run
    # directory, line breaks inside --set, optimiser values torch refuses, a CUDA device the machine lacks
    os.mkfifo(d / "out-fifo.npz")
    cases += [("select: out onto a FIFO", ["select", good, "--n", "4", "--out", str(d / "out-fifo.npz")]),
              ("select: out onto /dev/null", ["select", good, "--n", "4", "--out", "/dev/null"]),
              ("select: empty out", ["select", good, "--n", "4", "--out", ""]),
              ("run: empty out", ["run", "smoke", "--out", ""])]
    for name, extra in {
        "arm name escaping upwards": ["--set", 'arms.0.name="../../escape"'],
        "arm name absolute": ["--set", f'arms.0.name="{d / "abs"}"'],
        "arm name with a separator": ["--set", 'arms.0.name="a/b"'],
        "arm name hidden": ["--set", 'arms.0.name=".hidden"'],
        "--set with a line break": ["--set", "n_train=8\nseed=1"],
        "--set with a table after a line break": ["--set", "iterations=1\n[x]"],
        "adam_beta1 one": ["--set", "adam_beta1=1.0"], "weight_decay negative": ["--set", "weight_decay=-1.0"],
        "grad_clip negative": ["--set", "grad_clip=-1.0"], "domain_steps negative": ["--set", "domain_steps=-1"],
        "mem_ratio zero": ["--set", "mem_ratio=0"], "seeds not integers": ["--set", "seeds=[1.5]"],
        "a CUDA device the machine lacks": ["--set", 'device="cuda:7"'],
    }.items():
        cases.append((f"run: {name}", run(*extra)))
        cases.append((f"run --dry-run: {name}", run("--dry-run", *extra)))
    deep = d / "deep.toml"
    deep.write_text("x = " + "[" * 100000 + "]" * 100000 + "\n")
    cases.append(("run: TOML nested too deeply", ["run", str(deep), "--out", out, "--dry-run"]))
    for name, make in {"config.json nested too deeply": lambda r: (r / "config.json").write_text("[" * 100000 + "]" * 100000),
                       "config.json a FIFO": lambda r: os.mkfifo(r / "config.json"),
                       "config.json /dev/zero": lambda r: os.symlink("/dev/zero", r / "config.json")}.items():
        r = d / ("report-" + name.replace(" ", "-").replace("/", ""))
        r.mkdir(exist_ok=True)
        make(r)
        cases.append((f"report: {name}", ["report", str(r), "--out", out]))
    np.save(d / "huge-values.npy", np.random.default_rng(0).random((20, 5)) * 1e200)
    cases.append(("fid: vectors near the float range", ["fid", str(d / "huge-values.npy"), "--ref",
                                                        str(d / "huge-values.npy")]))
    (d / "bad.toml").write_text("n_train = [\n")
    (d / "latin1.toml").write_bytes("data = \"d\xe9\"\n".encode("latin-1"))
    (d / "arms-not-list.toml").write_text("arms = 3\n")
    (d / "unknown.toml").write_text("colour = 'red'\n")
    for name in ("bad.toml", "latin1.toml", "arms-not-list.toml", "unknown.toml", "missing.toml"):
        cases.append((f"run: config {name}", ["run", str(d / name), "--out", out]))
    cases.append(("run: unknown preset", ["run", "no-such-preset", "--out", out]))
    cases.append(("run: out is a file", ["run", "smoke", "--out", good]))
    cases.append(("run: dry run of a bad value", ["run", "smoke", "--out", out, "--dry-run", "--set",
                                                  "n_train=0"]))
    # report: directories that are not runs, damaged runs, bad outputs
    notrun = d / "not-a-run"
    notrun.mkdir(exist_ok=True)
    damaged = {}
    for name, text in {"config not an object": b"[1, 2]", "config not UTF-8": b"{\"data\": \"d\xe9\"}",
                       "config not JSON": b"{", "config empty": b""}.items():
        r = d / ("report-" + name.replace(" ", "-"))
        r.mkdir(exist_ok=True)
        (r / "config.json").write_bytes(text)
        damaged[name] = r
    cases += [("report: missing dir", ["report", str(d / "nope"), "--out", out]),
              ("report: not a run", ["report", str(notrun), "--out", out]),
              ("report: a file", ["report", good, "--out", out])]
    cases += [(f"report: {name}", ["report", str(r), "--out", out]) for name, r in damaged.items()]
    for name, row in {"a row without its arm": {"iteration": 0}, "a negative iteration": {"arm": "a", "iteration": -1},
                      "a seed that is text": {"arm": "a", "iteration": 0, "seed": "zero"}}.items():
        r = d / ("report-rows-" + name.replace(" ", "-"))
        r.mkdir(exist_ok=True)
        (r / "config.json").write_text(json.dumps(config_to_dict(resolve_config("smoke"))))
        (r / "metrics.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
        cases.append((f"report: metrics with {name}", ["report", str(r), "--out", out]))
    cases.append(("run: image_size beyond 4096", run("--set", "image_size=100000")))
    # the sixth session: values of the wrong type, checks that needed the data under --dry-run, feature folders,
    # metric values that are text, a threshold filter that would run for billions of passes, a one-image score
    for name, text in {"seeds as text": 'seeds = "0"\n', "data_root as a number": "data_root = 5\n",
                       "spaces as text": 'spaces = "pixel"\n', "name as a number": "[[arms]]\nname = 7\n"}.items():
        f = d / (name.replace(" ", "-") + ".toml")
        f.write_text(text)
        cases.append((f"run --dry-run: config with {name}", ["run", str(f), "--out", out, "--dry-run"]))
    labelless = d / "no-labels.npy"
    np.save(labelless, np.zeros((40, 8, 8), np.uint8))
    for name, extra in {
        "only an empty arm": ["--only", "0/"], "only a superscript seed": ["--only", "\u00b2"],
        "n_train beyond the data": ["--set", "n_train=5000"], "image_size 3": ["--set", "image_size=3"],
        "norm_groups 7": ["--set", "norm_groups=7"], "attention_levels 99": ["--set", "attention_levels=[99]"],
        "conditional without labels": ["--set", "conditional=true", "--set", f'data="{labelless}"'],
        "feature_dir a device": ["--set", 'feature_dir="/dev/null"', "--set", 'spaces=["dinov2-small"]',
                                 "--set", 'quality_metric="kid_pixel"'],
        "feature_dir without weights": ["--set", f'feature_dir="{d}"', "--set", 'spaces=["inception"]',
                                        "--set", 'quality_metric="kid_pixel"'],
        "domain space with feature_dir a file": ["--set", f'feature_dir="{good}"', "--set", 'spaces=["domain"]'],
        "an empty item in seeds": ["--set", "seeds=0,,1"],
    }.items():
        cases.append((f"run: {name}", run(*extra)))
        cases.append((f"run --dry-run: {name}", run("--dry-run", *extra)))
    for space in ("domain", "dinov2-small"):
        cases.append((f"select: {space} with feature_dir a device", ["select", good, "--n", "4", "--space", space,
                                                                   "--feature-dir", "/dev/null", "--out", out]))
    r = d / "report-rows-text-values"
    r.mkdir(exist_ok=True)
    (r / "config.json").write_text(json.dumps(config_to_dict(resolve_config("smoke"))))
    (r / "metrics.jsonl").write_text("".join(json.dumps({"arm": "a", "iteration": t, "seed": 0, "fd_pixel": "1.5"})
                                             + "\n" for t in range(2)))
    cases.append(("report: metric values that are text", ["report", str(r), "--out", out]))
    # the sixth session's fresh attack (helper, 589 bad inputs): config values that fail only after writing, typed
    # probe values, weights that are there but garbage, features whose distances overflow, NaN weights
    (d / "date.toml").write_text("seed = 1979-05-27\n")
    cases.append(("run: a TOML date", ["run", str(d / "date.toml"), "--out", out]))
    cases.append(("run: an empty config name", ["run", "", "--out", out]))
    huge_labels = d / "huge-labels.npz"
    np.savez(huge_labels, images=np.zeros((40, 8, 8), np.uint8) + np.arange(40)[:, None, None].astype(np.uint8),
             labels=np.full(40, 10**9))
    weights = d / "garbage-weights"  # made above: dinov2-small's config.json is not JSON; inception is garbage
    for name, extra in {
        "batch_size beyond 2^20": ["--set", "batch_size=1000000000000"],
        "sample_batch beyond 2^20": ["--set", "sample_batch=1000000000000"],
        "an mps device the machine lacks": ["--set", 'device="mps"'],
        "an xpu device the machine lacks": ["--set", 'device="xpu:0"'],
        "compile on the CPU": ["--set", 'device="cpu"', "--set", "compile=true"],
        "labels up to 10^9": ["--set", "conditional=true", "--set", f'data="{huge_labels}"'],
        "garbage inception weights": ["--set", 'spaces=["pixel", "inception"]', "--set", f'feature_dir="{weights}"'],
        "garbage dinov2 folder": ["--set", 'spaces=["pixel", "dinov2-small"]', "--set", f'feature_dir="{weights}"'],
    }.items():
        cases.append((f"run: {name}", run(*extra)))
        cases.append((f"run --dry-run: {name}", run("--dry-run", *extra)))
    nan_unet = d / "nan-unet"
    if not nan_unet.exists():
        import torch

        from model_collapse.diffusion import build_unet
        from model_collapse.registry import MODEL_PRESETS

        u = build_unet(MODEL_PRESETS["tiny"], 8, 1)
        with torch.no_grad():
            for p in u.parameters():
                p.fill_(float("nan"))
        u.save_pretrained(str(nan_unet))
    cases.append(("run: init_from weights of NaN", run("--set", f'init_from="{nan_unet}"')))
    probe = ["probe", "digits", "--sizes", "4", "--steps", "2", "--out", out]
    for key, value in {"mem_ratio": "half", "warmup_steps": "soon", "sample_steps": "2.5", "workers": "many",
                       "copy_ratio": "[1, 2]"}.items():
        cases.append((f"probe: {key} = {value}", probe + ["--set", f"{key}={value}"]))
    np.save(d / "identical.npy", np.zeros((40, 8, 8), np.uint8))
    cases.append(("probe: identical images", ["probe", str(d / "identical.npy"), "--sizes", "4", "--steps", "2",
                                              "--set", "n_heldout=4", "--set", "n_eval=4", "--out", out]))
    for name, scale in {"near the float range": 1e300, "below the normal range": 1e-310}.items():
        np.save(d / f"scale-{scale:g}.npy", np.random.default_rng(3).random((20, 4)) * scale)
        cases.append((f"entropy: features {name}", ["entropy", str(d / f"scale-{scale:g}.npy")]))
    cases.append(("score: identical training images in the domain space",
                  ["score", good, "--train", str(d / "identical.npy"), "--space", "domain"]))
    big = d / "huge-png"
    big.mkdir(exist_ok=True)
    _png_header_only(big / "a.png", 10000, 10000)
    cases.append(("entropy: a 10000 x 10000 PNG", ["entropy", str(big)]))
    import torch

    wrong = d / "wrong-inception"
    wrong.mkdir(exist_ok=True)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(wrong / "inception.safetensors"))
    cases.append(("entropy: inception weights of another network", ["entropy", good, "--space", "inception",
                                                                    "--feature-dir", str(wrong)]))
    # the second fresh attack of the sixth session (400 bad inputs, 98.8% kept): what it found
    damaged = d / "run-with-damaged-config"
    damaged.mkdir(exist_ok=True)
    (damaged / "config.json").write_text('{"n_train": "x", "arms": 3}')
    cases.append(("run: resuming a run whose config.json is damaged", ["run", "smoke", "--out", str(damaged)]))
    cases.append(("run: --set nested too deeply", run("--set", "channels=" + "[" * 2000 + "2" + "]" * 2000)))
    for name, extra in {"pool_factor 10^12": ["--set", "arms.1.pool_factor=1e12"],
                        "n_eval 10^9": ["--set", "n_eval=1000000000"]}.items():
        cases.append((f"run: {name}", run(*extra)))
        cases.append((f"run --dry-run: {name}", run("--dry-run", *extra)))
    np.save(d / "rows.npy", np.random.default_rng(1).random((40, 6)).astype(np.float32))
    np.save(d / "one-row.npy", np.random.default_rng(2).random((1, 6)).astype(np.float32))
    np.save(d / "same-rows.npy", np.ones((5, 6), np.float32))
    cases += [("select: threshold needing billions of passes", ["select", str(d / "rows.npy"), "--n", "5", "--method",
                                                                "threshold", "--tau0", "1e300", "--decay",
                                                                "0.99999999"]),
              ("score: one training image", ["score", str(d / "rows.npy"), "--train", str(d / "one-row.npy")]),
              ("score: identical training images", ["score", str(d / "rows.npy"), "--train",
                                                    str(d / "same-rows.npy")])]
    # (`model-collapse` alone is not bad input: it prints the help and exits 0)
    cases += [("unknown command", ["train"]), ("help of unknown command", ["nope", "--help"])]
    return cases


def _listing(*folders):
    return sorted(str(p) for f in folders for p in f.rglob("*"))


def _timeout(signum, frame):
    raise TimeoutError("a bad input made the command hang")


def _assert_kept(capsys, argv, *watched):
    """The promise for one bad input; `watched` folders must not change (outputs, the arena of inputs)."""
    import signal

    before = _listing(*watched)
    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(60)
    try:
        rc = main(list(argv))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (argv, rc, err[-500:])
    assert len(lines) == 1 and lines[0].startswith("model-collapse: error:"), (argv, err[-1500:])
    assert "Traceback" not in err and out == "", argv
    assert _listing(*watched) == before, ("something was written", argv)


def test_bad_image_files_in_every_position(arena, capsys, tmp_path, monkeypatch):
    d, good, files = arena
    monkeypatch.chdir(tmp_path)  # default outputs (runs/...) would land here
    outs = tmp_path / "outs"
    outs.mkdir()
    assert set(FILE_KINDS) == set(files)
    for kind in FILE_KINDS:
        for position, build in POSITIONS.items():
            _assert_kept(capsys, build(files[kind], good, str(outs / "o.npz")), outs, d)
    assert not (tmp_path / "runs").exists()


def test_bad_options_and_outputs_of_every_command(arena, capsys, tmp_path, monkeypatch):
    d, good, _ = arena
    monkeypatch.chdir(tmp_path)
    outs = tmp_path / "outs"
    outs.mkdir()
    cases = _options_attack(good, str(outs / "o"), d)
    assert len(cases) >= 100
    for name, argv in cases:
        _assert_kept(capsys, argv, outs, d)
    assert not (tmp_path / "runs").exists()
