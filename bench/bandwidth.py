"""This machine's memory read bandwidth at 1..N threads, the ceiling of decode speed.

    python bench/bandwidth.py            # 1 thread and every count up to the physical cores
    python bench/bandwidth.py --mib 1024 --threads 1,2

Decoding one token reads every weight once, so tokens/s x weight bytes cannot exceed it;
`phimlx bench` prints each engine's achieved bandwidth against the figure measured here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phimlx.bench import cli, machine  # noqa: E402


def main(argv: list[str]) -> int:
    """Print one line per thread count: GB/s and how it was measured."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", help="comma-separated thread counts (default 1..cores)")
    p.add_argument("--mib", type=int, default=512, help="array size in MiB (default 512)")
    args = p.parse_args(argv)
    cores = machine.physical_cores() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else range(1, cores + 1)
    print(machine.describe(machine.machine_info()))
    for t in counts:
        r = cli.run_child({"engine": "_bandwidth", "threads": t, "mib": args.mib}, timeout=600)
        if not r.get("ok"):
            print(f"{t} threads: failed: {r.get('error')}", file=sys.stderr)
            return 1
        print(
            f"{t} thread{'s' if t > 1 else ''}: {r['bytes_per_s'] / 1e9:.1f} GB/s "
            f"({r['method']}, {args.mib} MiB)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
