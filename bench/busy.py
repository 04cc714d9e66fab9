"""Decode speed on a busy machine: phimlx and llama.cpp while another process decodes.

For each kind of load (none, a second phimlx decoding the same model, llama.cpp decoding
it), a load process is started that decodes without end on the same threads; then the
measured engines (phimlx's NumPy backend and llama-cpp-python, each in a fresh process,
alternating) each decode ``--tg`` tokens ``-r`` times; the load is stopped before the next
kind.  Prints, per load, each engine's median tok/s with its spread, the ratio of the
medians, and the slowest of our runs against our median (a collapse shows there, not in
the median).

    python bench/busy.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf -r 5

``--engines numpy:omp,numpy:tbb`` compares numba's threading layers instead (an engine
``numpy:LAYER`` runs with ``NUMBA_THREADING_LAYER=LAYER``; the load keeps the default).

Figures are as honest as the machine: on a 2-core machine two decoding processes with two
threads each share the cores, so both halve at best.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phimlx.bench.cli import run_child, runner_env, token_ids  # noqa: E402
from phimlx.bench.models import resolve  # noqa: E402

ENGINES = "numpy,llama.cpp"

# The load: a process that decodes random ids without end (restarting its context when full).
LOAD = """
import sys, numpy as np
engine, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(7)
if engine == "numpy":  # the backend itself, as the bench runners drive it: raw ids
    import fallback
    from phimlx.config import ModelConfig
    from phimlx.gguf import open_gguf
    mf = open_gguf(path)
    loaded = fallback.load(mf, ModelConfig.from_gguf(mf), threads=threads)
    while True:
        s = loaded.new_session(1024)
        for t in rng.integers(0, 1000, 1000).tolist():
            s.step(t)
else:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_threads=threads, n_ctx=1024, verbose=False)
    while True:
        llm.reset()
        for t in rng.integers(0, 1000, 1000).tolist():
            llm.eval([t])
"""


def start_load(kind: str, path: str, threads: int) -> subprocess.Popen | None:
    """The load process of ``kind`` ("none", "numpy" or "llama.cpp"), decoding by the time
    this returns (it has printed nothing; a few seconds are given to load and warm up)."""
    if kind == "none":
        return None
    proc = subprocess.Popen(
        [sys.executable, "-c", LOAD, kind, path, str(threads)],
        env=runner_env(threads),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(8)
    if proc.poll() is not None:
        raise RuntimeError(f"the {kind} load process exited with code {proc.returncode}")
    return proc


def stop_load(proc: subprocess.Popen | None) -> None:
    if proc is not None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_engine(job: dict, engine: str) -> dict:
    """One measured run of ``engine`` ("numpy:LAYER": numba's threading layer LAYER)."""
    name, _, layer = engine.partition(":")
    saved = os.environ.get("NUMBA_THREADING_LAYER")
    if layer:
        os.environ["NUMBA_THREADING_LAYER"] = layer  # the runner's environment copies ours
    try:
        return run_child({**job, "engine": name}, timeout=600)
    finally:
        if layer:
            os.environ.pop("NUMBA_THREADING_LAYER")
            if saved is not None:
                os.environ["NUMBA_THREADING_LAYER"] = saved


def main(argv: list[str]) -> int:
    """Run the loads and print the table; 1 if a run failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct", help="preset, repo or .gguf")
    p.add_argument("--tg", type=int, default=128, help="tokens decoded per run")
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--loads", default="none,numpy,llama.cpp", help="comma-separated loads")
    p.add_argument(
        "--engines", default=ENGINES, help="measured engines: numpy, numpy:LAYER, llama.cpp"
    )
    p.add_argument("--json", help="write every run's result here")
    args = p.parse_args(argv)
    model = resolve(args.model)
    _, tg_ids = token_ids(model.n_vocab, 0, args.tg, 1234)
    job = {
        "model": str(model.path),
        "threads": args.threads,
        "pp_ids": [],
        "tg_ids": tg_ids,
        "max_context": args.tg + 64,
        "warmup": True,
        "n_vocab": model.n_vocab,
    }
    engines = args.engines.split(",")
    results: dict[str, dict[str, list[float]]] = {}
    failed = False
    for load in args.loads.split(","):
        proc = start_load(load, str(model.path), args.threads)
        runs: dict[str, list[float]] = {e: [] for e in engines}
        try:
            for rep in range(args.repetitions):
                order = engines if rep % 2 == 0 else engines[::-1]
                for e in order:
                    r = run_engine(job, e)
                    if not r.get("ok"):
                        print(f"{e} under {load} load failed: {r.get('error')}", file=sys.stderr)
                        failed = True
                        continue
                    runs[e].append(r["tg_tokens"] / r["tg_s"])
        finally:
            stop_load(proc)
        results[load] = runs
        print(f"\nload: {load} ({args.tg} tokens a run, {args.threads} threads, "
              f"{args.repetitions} runs each, alternating)")  # fmt: skip
        for e, v in runs.items():
            if v:
                print(
                    f"  {e:10s} median {statistics.median(v):6.1f} tok/s "
                    f"(min {min(v):.1f}, max {max(v):.1f})"
                )
        first, *others = engines
        for e in others:
            ours, peer = runs[first], runs[e]
            if ours and peer:
                mine = statistics.median(ours)
                print(
                    f"  {first} / {e} {mine / statistics.median(peer):.2f}x; "
                    f"{first} slowest / median {min(ours) / mine:.2f}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
