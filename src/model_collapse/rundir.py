"""The run directory: the source of truth of a run.

config.json is written before any work; every artifact is written to a temporary name and renamed into place;
metrics.jsonl gets one line per (arm, iteration) appended as each finishes, and is rewritten once, atomically, in
(iteration, arm) order when the run ends (`loop.order_rows`); an exclusive lock refuses a second process.
Nothing read back from here is ever unpickled.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from model_collapse.config import EXECUTION_KEYS, ArmConfig, RunConfig, config_to_dict, own_iteration0, stored_config
from model_collapse.errors import UserError


def _replace_or_clean(tmp: Path, path: Path) -> None:
    """Move a finished temporary file into place; if that fails (the target is a folder, the disk is full), the
    temporary file goes too."""
    try:
        os.replace(tmp, path)
    except IsADirectoryError:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{path}: is a folder where this file is written; move it away") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace_or_clean(tmp, path)


def _clean(obj):
    """JSON-safe: numpy scalars to Python, non-finite floats to None."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n").encode())


def atomic_save_npz(path: Path, **arrays) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.npz")
    try:
        np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items() if v is not None})
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _replace_or_clean(tmp, path)


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


JSON_LIMIT = 1 << 26  # a run's JSON files are kilobytes; a bigger one is not ours


def read_json_object(path: Path, what: str) -> dict:
    """A JSON object from a file, or a one-line error naming it (not a file, not UTF-8, not JSON, not an object)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise UserError(f"{p}: not a regular file (a {what} must be one)")
    if p.exists() and p.stat().st_size > JSON_LIMIT:
        raise UserError(f"{p}: {p.stat().st_size:,} bytes, too large for a {what}")
    try:  # an I/O error propagates (the command line reports it in one line): it says nothing of the content
        value = read_json(p)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: unreadable {what} ({str(e)[:120]})") from None
    except RecursionError:
        raise UserError(f"{path}: unreadable {what} (nested too deeply)") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: not a {what} (a JSON {type(value).__name__}, not an object)")
    return value


ROW_TEXT = ("arm", "paradigm", "selector", "verdict")  # a metrics row's text fields; verdict_evidence is an object


def _row_values_ok(row: dict) -> bool:
    """Every field but the text ones and the verdict's evidence is a number, a boolean or null (missing), or a
    list of numbers (class counts)."""
    def number(v):
        return v is None or isinstance(v, (int, float))

    return all(isinstance(v, str) if k in ROW_TEXT else
               isinstance(v, dict) if k == "verdict_evidence" else
               number(v) or (isinstance(v, list) and all(number(x) for x in v))
               for k, v in row.items())


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl. A trailing partial line (a crash mid-append: no newline) is ignored; any other line
    that is not a JSON object is damage, refused in one line naming its number (reading on would drop the rows
    after it, and a run would append duplicates)."""
    rows = []
    if not Path(path).exists():
        return rows
    if not Path(path).is_file():
        raise UserError(f"{path}: not a regular file (metrics.jsonl must be one)")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                row = None
            if not (isinstance(row, dict) and isinstance(row.get("arm"), str)
                    and isinstance(row.get("iteration"), int) and row["iteration"] >= 0
                    and isinstance(row.get("seed", 0), int) and _row_values_ok(row)):
                raise UserError(f"{path}: line {number} is not a metrics row (damaged file); restore it or move it "
                                f"away to measure again")
            rows.append(row)
    return rows


def _format_errors() -> tuple:
    from safetensors import SafetensorError

    return (zipfile.BadZipFile, ValueError, EOFError, KeyError, SafetensorError, UserError)  # (UnicodeDecodeError
    #                                                                                           is a ValueError)


FORMAT_ERRORS = _format_errors()  # what reading a damaged file raises (an I/O error is not among them)


def _images(a: np.ndarray) -> bool:
    return a.dtype == np.uint8 and a.ndim == 4 and a.shape[3] in (1, 3)


def _rank(ndim: int, kinds: str):
    return lambda a: a.ndim == ndim and a.dtype.kind in kinds


STAGE_ARRAYS = {  # what a stage's .npz holds, by file name: array name -> its test (readable, stage_array)
    "train.npz": {"images": _images},  # uint8 (N, H, W, C)
    "samples.npz": {"images": _images},
    "neighbours_pixel.npz": {"nearest": _rank(1, "iu"), "d1": _rank(1, "f"), "d2": _rank(1, "f")},
    "loss.npz": {"loss": _rank(1, "f")},
}


def readable(path: Path) -> bool:
    """Whether a stage's output file is whole: an .npz whose arrays all load (no pickles), a .safetensors whose
    tensors load, a .json object. Files are written atomically, so a bad one was damaged from outside. Only a
    format error counts: an I/O error (a full table of open files, a stale network mount) propagates rather than
    condemning a good file."""
    try:
        if path.suffix == ".npz":
            arrays = load_npz(path)
            return all(k in arrays and holds(arrays[k]) for k, holds in STAGE_ARRAYS.get(path.name, {}).items())
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                names, meta = set(f.keys()), f.metadata() or {}
                for k in names:
                    f.get_tensor(k)
            if path.name == "model.safetensors":  # a UNet's weights (its shapes are checked when loaded)
                return {"conv_in.weight", "conv_out.weight"} <= names
            if path.name == "train_state.safetensors":  # a checkpoint knows its step
                return meta.get("step", "").isdigit()
        elif path.suffix == ".json":
            obj = read_json_object(path, "stage file")
            if path.name == "metrics.json":  # a stage's measurements: numbers, the pixel space's always there
                return "gen_score_pixel" in obj and _row_values_ok(obj)
        return True
    except FORMAT_ERRORS:
        return False


def checkpoint_step(path: Path) -> int:
    """The training step a (whole) train_state.safetensors was saved at."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return int(f.metadata()["step"])


def set_aside(path: Path, then: str) -> None:
    """Move a damaged file to NAME.damaged (kept for inspection) with a one-line warning saying what happens next."""
    aside = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process moved it first
        return
    print(f"model-collapse: {path} is damaged; moved to {aside.name}, {then}", file=sys.stderr)


def whole(path: Path, then: str) -> bool:
    """Whether a file that is computed again when missing is there and readable; a damaged one is set aside."""
    if not path.exists():
        return False
    if readable(path):
        return True
    set_aside(path, then)
    return False


class RunDir:
    """An opened, locked run directory."""

    def __init__(self, path: Path, root: Path | None = None):
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path  # the run directory (above a seed's study)
        self._lock_fd: int | None = None

    # -- layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def iter_dir(self, arm: str | None, iteration: int) -> Path:
        """Where (arm, iteration) trains: iteration 0 is shared by all arms; later ones live under arms/<arm>/."""
        if iteration == 0:
            return self.path / "iter_000"
        return self.path / "arms" / arm / f"iter_{iteration:03d}"

    def sample_dir(self, arm: str | None, iteration: int, own_iteration0: bool = False) -> Path:
        """Where (arm, iteration) samples and is measured: as iter_dir, except that an arm sampling the shared
        iteration-0 model differently (its own guidance scale) keeps its samples under arms/<arm>/iter_000."""
        if iteration == 0 and own_iteration0 and arm is not None:
            return self.path / "arms" / arm / "iter_000"
        return self.iter_dir(arm, iteration)

    def study_dir(self, cfg: RunConfig, seed: int) -> "RunDir":
        """The directory of one seed's study: the run directory itself for a run without `seeds`, else
        RUN_DIR/seed_<seed>/, each laid out like a one-seed run (iter_000, arms/, features/, metrics.jsonl)."""
        return self if cfg.seeds is None else RunDir(self.path / f"seed_{seed:03d}", root=self.root)

    @contextmanager
    def hold(self, name: str, wait: bool = True):
        """An exclusive lock named `name` in this directory (iteration 0 of a seed, its metrics rows, one
        slice), held for the `with` block; without `wait`, a lock held elsewhere is a one-line error."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / f".lock-{name}", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                raise UserError(f"{self.path}: {name} is being run by another model-collapse process") from None
            yield
        finally:
            os.close(fd)

    def arm_sample_dir(self, cfg: RunConfig, arm: ArmConfig | None, iteration: int) -> Path:
        """sample_dir, with whether the arm samples iteration 0 itself decided from the config."""
        return self.sample_dir(arm.label() if arm else None, iteration, own_iteration0(cfg, arm))

    def feature_cache(self, name: str) -> Path:
        """Arrays computed once per run (real statistics, reference features), named by space."""
        return self.path / "features" / f"{name}.npz"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    # -- opening
    @classmethod
    def open(cls, path: Path, cfg: RunConfig, shared: bool = False) -> "RunDir":
        """Create or reopen RUN_DIR for this config; refuse a different config or a second process. With
        `shared`, other shared openers (processes running other slices of the study) are let in; a whole run
        still excludes every other process."""
        rd = cls(path)
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise UserError(f"{path}: exists and is not a directory")
        existing = path / "config.json"
        if existing.exists():
            stored = read_json_object(existing, "run config")
            stored_config(stored, existing)
            diff = config_difference(stored, config_to_dict(cfg))
            if diff:
                raise UserError(
                    f"{path} holds a run with a different config ({diff}); use another --out, or repeat the "
                    f"command that started it"
                )
        elif path.exists() and any(not p.name.startswith(".") for p in path.iterdir()):  # locks, temp files
            raise UserError(f"{path}: exists, is not empty, and holds no run (no config.json); choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        rd._lock(shared)
        if not existing.exists():
            atomic_write_json(existing, config_to_dict(cfg))
        return rd

    def _lock(self, shared: bool = False) -> None:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(f"{self.path} is in use by another model-collapse process; wait for it to finish") from None
        if not shared:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- metrics
    def write_metrics(self, rows: list[dict]) -> None:
        """Replace metrics.jsonl with these rows, atomically (the merged file of a run with several seeds, and a
        seed's rows in order at the end of a run)."""
        atomic_write_bytes(self.metrics_path, "".join(json.dumps(_clean(r)) + "\n" for r in rows).encode())

    @property
    def tracking_dir(self) -> Path:
        """Where trackers (`log_with`) write: RUN_DIR/tracking, one folder for every seed's study."""
        return self.root / "tracking"

    @staticmethod
    def save_losses(train_dir: Path, losses: np.ndarray) -> None:
        """A training stage's loss per step (`loss.npz`, beside its model)."""
        atomic_save_npz(Path(train_dir) / "loss.npz", loss=losses)

    @staticmethod
    def read_losses(train_dir: Path) -> np.ndarray | None:
        """The loss per step of the stage trained in train_dir (None when not recorded: runs from before)."""
        f = Path(train_dir) / "loss.npz"
        if not f.exists():
            return None
        return stage_array(f, "loss")

    def append_metrics(self, rows: list[dict]) -> None:
        """Append rows; first drop a partial trailing line left by a crash."""
        p = self.metrics_path
        if p.exists():
            raw = p.read_bytes()
            if raw and not raw.endswith(b"\n"):
                atomic_write_bytes(p, raw[: raw.rfind(b"\n") + 1])
        with open(p, "a") as f:
            for r in rows:
                f.write(json.dumps(_clean(r)) + "\n")
            f.flush()
            os.fsync(f.fileno())


def config_difference(stored: dict, given: dict) -> str:
    """'' when two configs describe the same experiment; else the first differing keys."""
    default = config_to_dict(RunConfig())
    default_arm = default["arms"][0]
    fill = lambda d: {**default, **d, "arms": [{**default_arm, **a} for a in d.get("arms", [])]}
    stored, given = fill(stored), fill(given)  # a key added since a run was written has its default there
    keys = sorted((set(stored) | set(given)) - set(EXECUTION_KEYS))
    diffs = [k for k in keys if stored.get(k) != given.get(k)]
    return ", ".join(f"{k}: {stored.get(k)!r} there, {given.get(k)!r} now" for k in diffs[:3])


# ---------------------------------------------------------------------------------------------- probe layout


def probe_row_path(out: Path, size: int, steps: int) -> Path:
    """A probe's row of one training-set size evaluated after `steps` training steps."""
    return Path(out) / f"size_{size:05d}" / f"steps_{steps:07d}.json"


def whole_row(path: Path) -> bool:
    """Whether a probe row (size_S/steps_T.json) is there and whole; a damaged one is set aside to be redone."""
    if not path.exists():
        return False
    try:
        _probe_row(path)
        return True
    except UserError:
        set_aside(path, "measuring it again")
        return False


def _probe_row(p: Path) -> dict:
    row = read_json_object(p, "probe row")
    if not all(isinstance(row.get(k), int) and not isinstance(row.get(k), bool) for k in ("size", "steps")) \
            or not _row_values_ok({k: v for k, v in row.items() if k not in ("size", "steps")}):
        raise UserError(f"{p}: not a probe row (damaged file); move it away and rerun the probe to redo it")
    return row


def read_probe(out: Path) -> list[dict]:
    """A probe's rows, one per (size, steps) file; a damaged one is refused in one line naming it."""
    rows = [_probe_row(p) for p in sorted(Path(out).glob("size_*/steps_*.json"))]
    return sorted(rows, key=lambda r: (r["size"], r["steps"]))


def stage_array(path: Path, key: str, ndim: int | None = None) -> np.ndarray:
    """One array of a stage's .npz, for reading outside the loop (the report): a damaged file, a missing array or
    one that fails its STAGE_ARRAYS test (or, for files not there, is not a float array of rank `ndim`) is a
    one-line error naming the file. The loop itself redoes such a stage instead (`whole`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not a regular file where a stage file should be; {REDO}")
    try:
        array = load_npz(path)[key]
    except KeyError:
        raise UserError(f"{path}: no {key!r} array (damaged file); {REDO}") from None
    except FORMAT_ERRORS as e:
        raise UserError(f"{path}: damaged ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); "
                        f"{REDO}") from None
    holds = STAGE_ARRAYS.get(path.name, {}).get(key) or _rank(ndim, "f")
    if not holds(array):
        raise UserError(f"{path}: {key!r} is a {array.ndim}-D {array.dtype} array, not what the stage writes "
                        f"(damaged file); {REDO}")
    return array


REDO = "rerun `model-collapse run` on the run directory to redo that stage, or move the file away"
