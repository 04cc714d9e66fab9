"""Speculative decoding side by side: phimlx plain, phimlx prompt lookup, llama-cpp-python
plain and llama-cpp-python's prompt lookup (`LlamaPromptLookupDecoding`), same GGUF, same
token ids, greedy, alternating runs; decode tokens/s medians, spread and ratios.

    python bench/speculative.py --model path/to/SmolLM2-135M-Instruct.Q4_1.gguf -r 5

Two prompts: an input-grounded one (repeat a ~40-line program with one change: the output
copies the input) and a free-form one (where drafts are rarely right, and the adaptive
length must keep the cost near zero).
"""

from __future__ import annotations

import argparse
import statistics
import time

import phimlx

PROGRAM = """import json
import sys
from dataclasses import dataclass


@dataclass
class Item:
    name: str
    price: float
    quantity: int

    def total(self) -> float:
        return self.price * self.quantity


def load(path: str) -> list[Item]:
    with open(path) as f:
        rows = json.load(f)
    return [Item(r["name"], float(r["price"]), int(r["quantity"])) for r in rows]


def summary(items: list[Item]) -> dict[str, float]:
    total = sum(item.total() for item in items)
    count = sum(item.quantity for item in items)
    return {"total": total, "count": count, "mean": total / count if count else 0.0}


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: inventory.py FILE", file=sys.stderr)
        return 2
    items = load(sys.argv[1])
    for key, value in summary(items).items():
        print(f"{key}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
"""
PROMPTS = {
    "grounded": "Here is a program:\n\n```python\n"
    + PROGRAM
    + "```\n\nRewrite the whole program with `summary` renamed to `report`. Keep everything "
    "else the same.",
    "free-form": "Write a story about a lighthouse keeper who finds a message in a bottle.",
}


def run_phimlx(model, ids, n, draft):
    r = model.generate(
        ids, temperature=0, max_tokens=n, repeat_penalty=1.0, cache=False, draft=draft
    )
    s = r.stats
    return s.generation_tps, len(r.tokens), s.accepted_tokens, s.draft_tokens


def run_llama(llm, ids, n):
    llm.reset()
    first = last = None
    count = 0
    for _ in llm.create_completion(ids, max_tokens=n, temperature=0, stream=True):
        now = time.perf_counter()
        first = first or now
        last = now
        count += 1
    return ((count - 1) / (last - first) if count > 1 else 0.0), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("-n", "--max-tokens", type=int, default=400)
    ap.add_argument("-r", "--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-pred-tokens", type=int, default=10, help="llama-cpp-python's")
    args = ap.parse_args()

    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    model = phimlx.load(args.model, backend="numpy", threads=args.threads)
    common = dict(n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    plain = llama_cpp.Llama(args.model, **common)
    lookup = llama_cpp.Llama(
        args.model,
        draft_model=LlamaPromptLookupDecoding(num_pred_tokens=args.num_pred_tokens),
        logits_all=True,  # llama-cpp-python's draft check reads every position's logits
        **common,
    )
    for name, prompt in PROMPTS.items():
        ids = model.encode_prompt(prompt)
        runs: dict[str, list[float]] = {
            k: [] for k in ("ours", "ours+lookup", "llama", "llama+lookup")
        }
        info = ""
        for rep in range(args.repetitions + 1):  # the first round warms up
            tps, n, acc, dr = run_phimlx(model, ids, args.max_tokens, None)
            t2, n2, acc, dr = run_phimlx(model, ids, args.max_tokens, "lookup")
            t3, n3 = run_llama(plain, ids, args.max_tokens)
            t4, n4 = run_llama(lookup, ids, args.max_tokens)
            if rep:
                for k, v in zip(runs, (tps, t2, t3, t4), strict=True):
                    runs[k].append(v)
            info = f"tokens {n}/{n2}/{n3}/{n4}, drafts accepted {acc}/{dr}"
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"\n{name} prompt ({len(ids)} tokens), {info}")
        for k, v in runs.items():
            print(f"  {k:13s} median {med[k]:7.1f} tok/s  (min {min(v):.1f}, max {max(v):.1f})")
        print(
            f"  lookup / plain (ours) {med['ours+lookup'] / med['ours']:.2f}x; ours+lookup / "
            f"llama+lookup {med['ours+lookup'] / med['llama+lookup']:.2f}x; llama+lookup / "
            f"llama {med['llama+lookup'] / med['llama']:.2f}x"
        )


if __name__ == "__main__":
    main()
