"""Micro-benchmark of the NumPy backend's quantized kernels at Phi-3-mini shapes.

Prints, per type, matvec throughput in G weights/s with 1 and 2 threads (the decode step:
Phi-3-mini has ~3.8 G weights, so tokens/s ~ Gweights/s / 3.8), for the default float
activations and (``int8`` rows) the int8-activation kernels, and prefill matmul GFLOP/s for
n = 128 and 512 prompt tokens next to the BLAS sgemm ceiling.  Weights are random blocks with
small finite scales (speed does not depend on the values); each shape is replicated until the
set exceeds ``--working-set`` MiB (default 160, beyond the L3 cache), so weights stream from
memory as in real decoding.  Warm-up first; each figure is the best of a few repetitions.
With one thread the time is the thread's CPU time (less noisy on a shared machine).

    python bench/kernels.py                       # all types
    python bench/kernels.py --types Q4_K Q6_K --no-matmul
    python bench/kernels.py --e2e MODEL.gguf      # whole-model prompt/decode vs llama.cpp

``--e2e`` alternates phimlx (NumPy backend) and llama-cpp-python on the same file in one
process, repetition by repetition, and prints medians and ratios (prompt = one prefill of
``--pp`` tokens, decode = ``--tg`` single-token steps; the backend's default int8
activations, or float ones with PHIMLX_INT8_ACTIVATIONS=0).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from fallback import kernels
from fallback.kernels import numba_available
from fallback.matrix import QuantMatrix
from fallback.threads import set_threads
from phimlx.gguf import TYPE_SIZES, GGMLType

# (name, rows, cols): the Phi-3-mini matrices of one layer, plus the output head.
SHAPES = [
    ("attn_out 3072x3072", 3072, 3072),
    ("qkv 9216x3072", 9216, 3072),
    ("gate_up 16384x3072", 16384, 3072),
    ("down 3072x8192", 3072, 8192),
    ("output 32064x3072", 32064, 3072),
]
TYPES = [
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q8_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "F16",
    "BF16",
    "F32",
]
# Byte offsets of the f16 scale fields in one block, overwritten with small finite values.
F16_FIELDS = {
    "Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q2_K": [80, 82],
    "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208],
}  # fmt: skip


def random_matrix(qtype: GGMLType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of ``qtype``, ``uint8 (rows, row_bytes)``, with finite scales."""
    block, size = TYPE_SIZES[qtype]
    if block == 1:
        vals = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if qtype == GGMLType.F16:
            return vals.astype(np.float16).view(np.uint8)
        if qtype == GGMLType.BF16:
            return (vals.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        return vals.view(np.uint8)
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)  # (n_blocks, size)
    for o in F16_FIELDS[qtype.name]:
        scale = rng.uniform(1e-4, 1e-2, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, o : o + 2] = scale.view(np.uint8)
    return raw


def best_time(fn, min_time: float = 0.3, reps: int = 3, clock=time.perf_counter) -> float:
    """Best mean seconds per call over ``reps`` runs of at least ``min_time`` each."""
    fn()
    best = float("inf")
    for _ in range(reps):
        n, t0 = 0, clock()
        while True:
            fn()
            n += 1
            dt = clock() - t0
            if dt >= min_time:
                break
        best = min(best, dt / n)
    return best


def end_to_end(path: str, threads: int, pp: int, tg: int, reps: int) -> None:
    """Prompt and decode tokens/s of phimlx vs llama.cpp, alternating, medians and ratios."""
    from llama_cpp import Llama

    import phimlx

    ids = np.random.default_rng(0).integers(100, 20000, size=pp + tg).tolist()
    model = phimlx.load(path, backend="numpy", threads=threads)
    llm = Llama(
        path, n_threads=threads, n_threads_batch=threads, n_batch=512, n_ctx=pp + tg + 8,
        logits_all=False, verbose=False,
    )  # fmt: skip

    def ours() -> tuple[float, float]:
        s = model.new_session(max_context=pp + tg + 8)
        t = time.perf_counter()
        s.prefill(ids[:pp])
        t_pp = time.perf_counter() - t
        t = time.perf_counter()
        for tok in ids[pp:]:
            s.step(tok)
        return pp / t_pp, tg / (time.perf_counter() - t)

    def llama() -> tuple[float, float]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:pp])
        t_pp = time.perf_counter() - t
        t = time.perf_counter()
        for tok in ids[pp:]:
            llm.eval([tok])
        return pp / t_pp, tg / (time.perf_counter() - t)

    runs: dict[str, list[tuple[float, float]]] = {"phimlx": [], "llama.cpp": []}
    ours(), llama()  # warm-up: compile, page the file in
    for _ in range(reps):
        for name, fn in (("phimlx", ours), ("llama.cpp", llama)):
            time.sleep(0.5)  # let the other engine's spinning threads settle
            runs[name].append(fn())
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    int8 = "on" if kernels.int8_activations_default() else "off"
    print(f"{os.path.basename(path)}: threads {threads}, pp {pp}, tg {tg}, {reps} reps, "
          f"load {load}, int8 activations {int8}")  # fmt: skip
    med = {}
    for name, rs in runs.items():
        med[name] = [statistics.median(r[i] for r in rs) for i in (0, 1)]
        every = " ".join(f"{a:.1f}/{b:.1f}" for a, b in rs)
        print(f"  {name:9} prompt {med[name][0]:8.1f} tok/s  decode {med[name][1]:7.2f} tok/s"
              f"   (runs {every})")  # fmt: skip
    r = [med["phimlx"][i] / med["llama.cpp"][i] for i in (0, 1)]
    print(f"  ratio     prompt {r[0]:8.3f}        decode {r[1]:7.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="*", default=TYPES)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--no-matmul", action="store_true", help="skip the prefill matmul figures")
    ap.add_argument("--numpy", action="store_true", help="the pure-NumPy path instead of numba")
    ap.add_argument("--working-set", type=int, default=160, help="MiB of weights per shape")
    ap.add_argument("--e2e", metavar="MODEL", help="whole model vs llama.cpp instead")
    ap.add_argument("--pp", type=int, default=64, help="--e2e prompt tokens")
    ap.add_argument("--tg", type=int, default=32, help="--e2e decode steps")
    ap.add_argument("--reps", type=int, default=5, help="--e2e repetitions")
    args = ap.parse_args()
    if args.e2e:
        end_to_end(args.e2e, max(args.threads), args.pp, args.tg, args.reps)
        return

    rng = np.random.default_rng(0)
    use_numba = numba_available() and not args.numpy
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"numba kernels: {use_numba}; load average {load}")
    print("matvec G weights/s (per-type aggregate = all five shapes' weights / their time)")
    header = f"{'type':10} {'thr':>3} " + " ".join(f"{s[0].split()[0]:>9}" for s in SHAPES)
    print(header + f" {'all':>7} {'~tok/s':>7}")
    for name in args.types:
        qtype = GGMLType[name]
        sets = []  # per shape: copies of one random matrix, together > the working set
        for _, r, c in SHAPES:
            raw = random_matrix(qtype, r, c, rng)
            copies = max(1, (args.working_set << 20) // raw.nbytes)
            sets.append([raw] + [np.roll(raw, i, axis=0) for i in range(1, copies)])
        kinds = [False]
        if use_numba and kernels.int8_kernel_available(qtype, SHAPES[0][2]):
            kinds.append(True)
        for int8 in kinds:
            mats = [
                [QuantMatrix(raw, qtype, (raw.shape[0], c), use_numba=use_numba,
                             int8_activations=int8) for raw in raws]
                for raws, (_, _, c) in zip(sets, SHAPES, strict=True)
            ]  # fmt: skip
            xs = [rng.standard_normal(ms[0].cols, dtype=np.float32) for ms in mats]
            label = name + (" int8" if int8 else "")
            for threads in args.threads:
                set_threads(threads)
                clock = time.thread_time if threads == 1 else time.perf_counter
                rates, total_w, total_t = [], 0, 0.0
                for ms, x in zip(mats, xs, strict=True):
                    outs = np.empty(ms[0].rows, np.float32)

                    def run(ms=ms, x=x, out=outs):
                        for m in ms:
                            m.matvec(x, out=out)

                    t = best_time(run, min_time=0.2, clock=clock) / len(ms)
                    rates.append(ms[0].rows * ms[0].cols / t / 1e9)
                    total_w += ms[0].rows * ms[0].cols
                    total_t += t
                agg = total_w / total_t / 1e9
                # Phi-3-mini: 32 layers of (qkv, attn_out, gate_up, down) + output head.
                layer = sum(ms[0].rows * ms[0].cols for ms in mats[:4])
                model_w = 32 * layer + mats[4][0].rows * mats[4][0].cols
                print(
                    f"{label:10} {threads:3d} "
                    + " ".join(f"{g:9.1f}" for g in rates)
                    + f" {agg:7.1f} {agg * 1e9 / model_w:7.2f}",
                    flush=True,
                )
        if not args.no_matmul:
            m = QuantMatrix(sets[2][0], qtype, (16384, 3072), use_numba=use_numba)  # gate_up
            set_threads(max(args.threads))
            for n in (128, 512):
                x = rng.standard_normal((n, m.cols), dtype=np.float32)
                t = best_time(lambda m=m, x=x: m.matmul(x), min_time=0.2, reps=2)
                print(
                    f"{name:6} matmul n={n:3d} {m.rows}x{m.cols}, {max(args.threads)} threads: "
                    f"{2 * n * m.rows * m.cols / t / 1e9:6.1f} GFLOP/s",
                    flush=True,
                )
        del sets
    if not args.no_matmul:
        set_threads(max(args.threads))
        a = rng.standard_normal((512, 3072), dtype=np.float32)
        b = rng.standard_normal((3072, 3072), dtype=np.float32)
        t = best_time(lambda: a @ b, min_time=0.2, reps=2)
        gflops = 2 * 512 * 3072**2 / t / 1e9
        print(f"BLAS sgemm 512x3072 @ 3072x3072 (the ceiling): {gflops:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
