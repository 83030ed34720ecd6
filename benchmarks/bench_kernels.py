"""Speed of the exact kNN kernel and the selectors against straightforward baselines, in the same process.

Run: .venv/bin/python benchmarks/bench_kernels.py [--quick] [--only NAME ...] [--kinds KIND ...]
Prints one line per benchmark with both timings and their ratio; results go into benchmarks/RESULTS.md by hand.
Baselines that would take minutes are timed on a prefix of their (constant-cost) steps and extrapolated; the
line says so.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from model_collapse.neighbours import knn  # noqa: E402
from model_collapse.rng import numpy_rng  # noqa: E402
from model_collapse.curation import bandwidth, inside_manifold  # noqa: E402
from model_collapse.selection import greedy_start, select, select_greedy, select_threshold  # noqa: E402
from model_collapse.spread import default_tau0  # noqa: E402


def clustered(m, d, intrinsic=12, clusters=64, seed=0):
    """Clustered data of low intrinsic dimension, like image features: a mixture in a random 12-dim subspace."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, intrinsic)))[0]
    centres = rng.normal(size=(clusters, intrinsic)) * 4
    z = centres[rng.integers(0, clusters, m)] + rng.normal(size=(m, intrinsic))
    return (z @ basis.T + rng.normal(size=(m, d)) * 0.05).astype(np.float32)


def noisy_clusters(m, d, clusters=256, rank=8, noise=0.4, seed=0):
    """A pool like features of generated images: 256 clusters of rank 8 plus isotropic noise on every coordinate
    (0.4 per coordinate against 0.5 along each cluster direction), quantised to uint8. The noise gives the pool many
    dimensions at the scale of the later picks, where projection bounds stop pruning."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    bases = np.linalg.qr(rng.normal(size=(clusters, d, rank)))[0]
    lab = rng.integers(0, clusters, m)
    x = centres[lab] + np.einsum("mr,mdr->md", rng.normal(size=(m, rank)) * 0.5, bases[lab])
    x += rng.normal(size=(m, d)) * noise
    lo, hi = np.quantile(x, [0.001, 0.999])
    return np.clip(np.round((x - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def uniform(m, d, seed=4):
    """The hardest case for any bound: uniform in the unit cube, float32, intrinsic dimension d."""
    return np.random.default_rng(seed).random((m, d), dtype=np.float32)


def pixels(m, d, seed=5):
    """Uniform 8-bit pixels (a pool of 32x32x3 noise images): the hardest case for any bound, on the integer values
    the loop's own pixel-space pools hold."""
    return np.random.default_rng(seed).integers(0, 256, (m, d), dtype=np.uint8)


def pool(kind, m, seed=0):
    """A pool of m rows of one benchmark kind (uniform and pixels: 3,072 columns, the others 384)."""
    if kind == "uniform":
        return uniform(m, 3072, seed=4 + seed)
    if kind == "pixels":
        return pixels(m, 3072, seed=5 + seed)
    return clustered(m, 384, seed=seed) if kind == "clustered" else noisy_clusters(m, 384, seed=seed)


KINDS = ["clustered", "noisy", "uniform", "pixels"]


def matmul_rate(n=2048, reps=5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def greedy_baseline(x, n, seed, steps):
    """Each step: one matrix-vector product of the pool with the newest centre (precomputed squared norms),
    running minimum, arg-max. Returns the selection prefix and seconds per step."""
    X = torch.as_tensor(x)
    sq = (X.double() ** 2).sum(1).float()
    c = greedy_start(len(x), seed)
    mind = torch.full((len(x),), float("inf"))
    chosen = [c]
    t = time.perf_counter()
    for _ in range(steps - 1):
        d = sq + sq[c] - 2 * (X @ X[c])
        mind = torch.minimum(mind, d)
        mind[chosen[-1]] = -1
        c = int(torch.argmax(mind))
        chosen.append(c)
    return chosen, (time.perf_counter() - t) / (steps - 1)


def greedy_exact_prefix(x, seed, steps):
    """The definition on exact float64 distances (from differences), for the first `steps` picks."""
    X = torch.as_tensor(x)
    c = greedy_start(len(x), seed)
    mind = torch.full((len(x),), float("inf"), dtype=torch.float64)
    chosen = [c]
    for _ in range(steps - 1):
        mind = torch.minimum(mind, ((X.double() - X[c].double()) ** 2).sum(1))
        mind[chosen] = -1
        c = int(torch.argmax(mind))
        chosen.append(c)
    return chosen


def threshold_baseline(x, n, seed, tau0, decay, time_limit=None):
    """The sequential definition: one point at a time against the accepted set (numpy, vectorised per point)."""
    X = np.asarray(x, np.float64)
    order = numpy_rng(seed, "threshold-order").permutation(len(X))
    acc, is_acc, tau = [], np.zeros(len(X), bool), tau0
    buf = np.empty((n, X.shape[1]))
    t0 = time.perf_counter()
    visited = 0
    while len(acc) < n:
        for p in order:
            if is_acc[p]:
                continue
            visited += 1
            k = len(acc)
            if k == 0 or (((buf[:k] - X[p]) ** 2).sum(1) > tau * tau).all():
                buf[k] = X[p]
                acc.append(int(p))
                is_acc[p] = True
                if len(acc) == n:
                    break
            if time_limit and time.perf_counter() - t0 > time_limit:
                return None, time.perf_counter() - t0, visited
        else:
            tau *= decay
    return acc, time.perf_counter() - t0, visited


def _timed(f, rounds):
    """f's result, its median time over `rounds` calls and those times (the first call included: a user's only
    call is a first one)."""
    times = []
    for _ in range(max(1, rounds)):
        t = time.perf_counter()
        out = f()
        times.append(time.perf_counter() - t)
    return out, float(np.median(times)), "/".join(f"{t:.2f}" for t in times)


def bench_greedy(quick, rounds):
    """Each pool kind: the selector against the float32 matrix-vector loop (extrapolated from its first 300 steps,
    which cost as much as any later step), and the share of the machine's matmul rate the selector reaches on the
    distances it computes (2 d flops each)."""
    for kind in KINDS:
        m = (4096 if kind in ("uniform", "pixels") else 65536) // (4 if quick else 1)
        x, n = pool(kind, m), m // 4
        d = x.shape[1]
        steps = min(300, n)
        xf = x.astype(np.float32)
        prefix, per_step = greedy_baseline(xf, n, 0, steps)
        rate = matmul_rate()
        sel, fast, runs = _timed(lambda: select_greedy(x, n, 0), rounds)
        exact = list(sel.indices[:steps]) == greedy_exact_prefix(xf, 0, steps)
        agree = next((i for i, (a, b) in enumerate(zip(sel.indices, prefix)) if a != b), steps)
        base = per_step * (n - 1)
        pairs = sel.params["distances_computed"]
        print(f"greedy {kind} M={m} d={d} {x.dtype} N={n}: baseline {base:.1f} s (extrapolated from {steps} steps "
              f"at {per_step * 1e3:.2f} ms/step), fast {fast:.2f} s (median of {runs}), ratio {base / fast:.1f}x; "
              f"first {steps} picks "
              f"equal the exact float64 definition: {exact} (the float32 baseline agrees for the first {agree}); "
              f"distances computed {pairs / (m * n):.2f} of M*N, at {2 * d * pairs / fast / 1e9:.0f} GFLOP/s over "
              f"the whole run ({2 * d * pairs / fast / 1e9 / rate:.0%} of matmul {rate:.0f})", flush=True)


def bench_threshold(quick, rounds):
    """Each pool kind: the filter against the sequential definition at the same tau0 (the filter's default, chosen
    by `default_tau0` and timed apart), and end to end: tau0 and the filter against the sequential loop alone (it
    is handed tau0). The matmul share counts one M x N product (2 M N d flops), the work the filter's products
    amount to."""
    for kind in KINDS:
        m = (4096 if kind in ("uniform", "pixels") else 16384) // (4 if quick else 1)
        x, n = pool(kind, m, seed=1), m // 4
        d = x.shape[1]
        rate = matmul_rate()
        tau0, t_tau0, tau0_runs = _timed(lambda: default_tau0(x, 0), rounds)
        sel, fast, runs = _timed(lambda: select_threshold(x, n, 0, tau0=tau0), rounds)
        acc, base, visited = threshold_baseline(x, n, 0, tau0, 0.95, time_limit=60 if quick else 600)
        same = acc is not None and list(sel.indices) == acc
        note = "" if acc is not None else f" (stopped after {visited} visits; a lower bound)"
        print(f"threshold {kind} M={m} d={d} {x.dtype} N={n}: baseline {base:.1f} s{note}; filter at the same tau0 "
              f"{fast:.2f} s (median of {runs}), ratio {base / fast:.0f}x, identical: {same}, passes "
              f"{sel.params['passes']}, "
              f"{2 * m * n * d / fast / 1e9:.0f} GFLOP/s nominal ({2 * m * n * d / fast / 1e9 / rate:.0%} of matmul "
              f"{rate:.0f}); choosing tau0 {t_tau0:.2f} s (median of {tau0_runs}), end to end {t_tau0 + fast:.2f} s, "
              f"ratio {base / (t_tau0 + fast):.0f}x", flush=True)


def herding_baseline(x, ref, n, seed, steps):
    """Kernel herding the straightforward way: the pool's mean kernel to the reference once (float64 tiles), then
    per pick one float64 matrix-vector product of the pool with the newest pick, the running kernel sums and an
    arg-max. Returns the prefix of picks and the seconds of the reference pass and per pick."""
    X, R = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    h = bandwidth(ref, seed)
    t = time.perf_counter()
    xs, rs = (X * X).sum(1), (R * R).sum(1)
    mu = torch.zeros(len(X), dtype=torch.float64)
    for b in range(0, len(R), 2048):
        mu += torch.exp(-(xs[:, None] + rs[None, b:b + 2048] - 2 * X @ R[b:b + 2048].T).clamp(min=0) / (2 * h * h)).sum(1)
    mu /= len(R)
    t_mu = time.perf_counter() - t
    ksum = torch.zeros(len(X), dtype=torch.float64)
    taken = torch.zeros(len(X), dtype=torch.bool)
    chosen = []
    t = time.perf_counter()
    for i in range(steps):
        score = mu - ksum / (i + 1)
        score[taken] = -float("inf")
        c = int(torch.argmax(score))
        chosen.append(c)
        taken[c] = True
        ksum += torch.exp(-(xs + xs[c] - 2 * (X @ X[c])).clamp(min=0) / (2 * h * h))
    return chosen, t_mu, (time.perf_counter() - t) / steps


def _curation_data(quick):
    m, d, n, r = (16384, 384, 4096, 4096) if quick else (65536, 384, 16384, 16384)
    x = clustered(m, d, seed=2)
    ref = clustered(r, d, seed=2)[: r]  # the same mixture: a realistic reference
    return x, ref, m, d, n, r


def bench_gated(quick, rounds):
    """gated against its straightforward loop: membership by one float64 distance pass, then the float32
    matrix-vector farthest-point loop (its per-step cost extrapolated from a prefix)."""
    x, ref, m, d, n, r = _curation_data(quick)
    t = time.perf_counter()
    ins = np.flatnonzero(inside_manifold(x, ref))
    t_gate = time.perf_counter() - t
    steps = 300
    _, per_step = greedy_baseline(x[ins], n, 0, steps)
    base = t_gate + per_step * n
    t = time.perf_counter()
    sel = select(x, n, "gated", 0, reference=ref)
    fast = time.perf_counter() - t
    print(f"gated M={m} d={d} N={n} reference {r}: baseline {base:.1f} s (gate {t_gate:.1f} s + farthest-point "
          f"extrapolated from {steps} steps at {per_step * 1e3:.2f} ms/step), fast {fast:.1f} s, ratio "
          f"{base / fast:.1f}x; {sel.params['inside']} of {m} inside", flush=True)


def bench_capped(quick, rounds):
    """capped against its straightforward form: the reference's nearest-neighbour spacing by sklearn's brute
    force, the float32 matrix-vector farthest-point loop (per-step cost extrapolated from a prefix), then each
    pick's exact distance to the picks before it until one falls below the spacing (a linear scan)."""
    x, ref, m, d, n, r = _curation_data(quick)
    t = time.perf_counter()
    s = float(np.median(_sk_nn(ref, ref, 2)[:, 1]))
    t_space = time.perf_counter() - t
    steps = 300
    order, per_step = greedy_baseline(x, n, 0, steps)
    t = time.perf_counter()
    sel = select(x, n, "capped", 0, reference=ref)
    fast = time.perf_counter() - t
    full = sel.indices[: sel.params["spread_picks"] + 1]  # the scan's work: every kept pick and the first below
    t = time.perf_counter()
    X = np.asarray(x, np.float64)
    for i in range(1, len(full)):
        np.sqrt(((X[full[:i]] - X[full[i]]) ** 2).sum(1).min())
    t_scan = time.perf_counter() - t
    base = t_space + per_step * n + t_scan
    print(f"capped M={m} d={d} N={n} reference {r}: baseline {base:.1f} s (spacing {t_space:.1f} s + farthest-"
          f"point extrapolated from {steps} steps at {per_step * 1e3:.2f} ms/step + scan {t_scan:.1f} s), fast "
          f"{fast:.1f} s, ratio {base / fast:.1f}x; spacing {sel.params['spacing']:.3f} (sklearn {s:.3f}), "
          f"{sel.params['spread_picks']} spread picks, first {steps} picks equal greedy's baseline: "
          f"{list(sel.indices[:min(steps, sel.params['spread_picks'])]) == order[:min(steps, sel.params['spread_picks'])]}",
          flush=True)


def bench_herding(quick, rounds):
    """herding against its straightforward loop (per-pick cost extrapolated from a prefix of picks; the one-off
    pass over the reference timed whole)."""
    x, ref, m, d, n, r = _curation_data(quick)
    steps = 300
    prefix, t_mu, per_pick = herding_baseline(x, ref, n, 0, steps)
    base = t_mu + per_pick * n
    t = time.perf_counter()
    sel = select(x, n, "herding", 0, reference=ref)
    fast = time.perf_counter() - t
    same = list(sel.indices[:steps]) == prefix
    print(f"herding M={m} d={d} N={n} reference {r}: baseline {base:.1f} s (reference pass {t_mu:.1f} s + "
          f"extrapolated from {steps} picks at {per_pick * 1e3:.2f} ms/pick), fast {fast:.1f} s, ratio "
          f"{base / fast:.1f}x; first {steps} picks equal the baseline's: {same}", flush=True)


def _sk_nn(ref, q, k):
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute").fit(ref)
    return nn.kneighbors(q)[0]


def _rounds(baseline, ours, rounds):
    """Alternate baseline and ours `rounds` times (the machine's speed drifts; a ratio within one round compares
    like with like). Returns per-round (baseline s, ours s, float32 matmul GFLOP/s right after ours) and the
    results of the last round. Callers warm both up first (imports, thread pools)."""
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        base_out = baseline()
        t_base = time.perf_counter() - t
        t = time.perf_counter()
        our_out = ours()
        t_ours = time.perf_counter() - t
        times.append((t_base, t_ours, matmul_rate()))
    return times, base_out, our_out


def _summary(times, flops):
    ratios = sorted(b / o for b, o, _ in times)
    shares = [flops / o / 1e9 / rate for _, o, rate in times]
    per_round = ", ".join(f"{b:.1f}/{o:.1f} s = {b / o:.2f}x at {flops / o / 1e9:.0f} GFLOP/s ({flops / o / 1e9 / rate:.0%} "
                          f"of matmul {rate:.0f})" for b, o, rate in times)
    return (f"median ratio {ratios[len(ratios) // 2]:.2f}x (min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x; median share of "
            f"the matmul rate {sorted(shares)[len(shares) // 2]:.0%}); rounds baseline/ours: {per_round}")


def bench_entropy(quick, rounds):
    n, d = (4096, 3072) if quick else (16384, 3072)
    x = np.random.default_rng(2).random((n, d), dtype=np.float32)
    flops = n * n * d  # half the matrix, 2 flops per multiply-add
    _sk_nn(x[:512], x[:512], 2), knn(x[:512], None, 1)  # warm-up
    for prec in ("float32", "float64"):
        times, sk, r = _rounds(lambda: _sk_nn(x, x, 2)[:, 1], lambda prec=prec: knn(x, None, 1, precision=prec),
                               rounds if prec == "float32" else 1)
        rel = float(np.max(np.abs(r.distances[:, 0] - sk) / sk))
        print(f"entropy kNN n={n} d={d} {prec} (sklearn NearestNeighbors brute / ours): {_summary(times, flops)}; "
              f"max rel diff {rel:.1e}, rechecked {r.rechecked}", flush=True)


def bench_score(quick, rounds):
    n, d = (4096, 3072) if quick else (16384, 3072)
    rng = np.random.default_rng(3)
    gen, train = rng.random((n, d), dtype=np.float32), rng.random((n, d), dtype=np.float32)
    _sk_nn(train[:512], gen[:512], 1), knn(gen[:512], train[:512], 2)  # warm-up
    times, sk, r = _rounds(lambda: _sk_nn(train, gen, 1)[:, 0], lambda: knn(gen, train, 2), rounds)
    rel = float(np.max(np.abs(r.distances[:, 0] - sk) / sk))
    print(f"gen score kNN {n}x{n} d={d} (sklearn / ours): {_summary(times, 2 * n * n * d)}; max rel diff {rel:.1e}",
          flush=True)


def bench_memory(quick, rounds):
    """Peak resident memory of generalization-score kNN against n reference rows, beyond the data itself."""
    n = 20000 if quick else 100000
    code = f"""
import resource, numpy as np, sys
sys.path.insert(0, {os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'src')!r})
from model_collapse.neighbours import knn
x = np.random.default_rng(0).random(({n}, 3072), dtype=np.float32)
q = x[:2048].copy()
import torch; torch.zeros(1)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
knn(q, x, 2)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base, peak)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[0]) / 2**20, int(out[1]) / 2**20
    data = n * 3072 * 4 / 2**30
    print(f"memory kNN 2048 queries vs n={n} d=3072 float32: data {data:.2f} GiB, peak RSS grew {peak - base:.2f} GiB "
          f"above the loaded data (limit: 1 GiB)", flush=True)


BENCHES = {"greedy": bench_greedy, "threshold": bench_threshold,
           "gated": bench_gated, "capped": bench_capped, "herding": bench_herding, "entropy": bench_entropy, "score": bench_score, "memory": bench_memory}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes -> seconds)")
    ap.add_argument("--only", nargs="*", default=list(BENCHES))
    ap.add_argument("--rounds", type=int, default=3,
                    help="baseline/ours alternations of the kNN benchmarks; calls of the selectors (median)")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS, help="pool kinds of greedy and threshold")
    args = ap.parse_args()
    KINDS[:] = args.kinds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 matmul "
          f"{matmul_rate():.0f} GFLOP/s", flush=True)
    for name in args.only:
        BENCHES[name](args.quick, args.rounds)
    print(f"float32 matmul after: {matmul_rate():.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
