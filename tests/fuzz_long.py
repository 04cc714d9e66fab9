"""Fuzz phimlx's GGUF loader at length.

    python tests/fuzz_long.py --examples 100000 --seed 1    # random structure-aware mutations
    python tests/fuzz_long.py --atheris -- -max_total_time=3600   # coverage-guided (atheris)

The random mode is the CI campaign of tests/test_fuzz_gguf.py run longer, in chunks of
child processes so that a hard crash is reported with its file and the run goes on.
Reproducers (and the file that crashed a child) are kept in --workdir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def random_mode(args: argparse.Namespace) -> int:
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="phimlx-fuzz-"))
    totals: dict[str, int] = {}
    findings: list[dict] = []
    done, chunk, run = 0, args.chunk, 0
    while done < args.examples:
        n = min(chunk, args.examples - done)
        wd = workdir / f"run{run}"
        wd.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-X", "faulthandler", str(TESTS / "test_fuzz_gguf.py"),
               "--examples", str(n), "--seed", str(args.seed * 100_003 + run), "--workdir",
               str(wd), "--json"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode in (0, 1) and proc.stdout.strip():
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            for k, v in result["counts"].items():
                totals[k] = totals.get(k, 0) + v
            findings += result["findings"]
        else:
            totals["crashes"] = totals.get("crashes", 0) + 1
            current = (wd / "current.json").read_text() if (wd / "current.json").exists() else "?"
            findings.append({"kind": "crash", "exit": proc.returncode, "case": current,
                             "reproducer": str(wd / "current.gguf"),
                             "stderr": proc.stderr[-3000:]})  # fmt: skip
        done += n
        run += 1
        print(f"{done}/{args.examples}: {totals}", flush=True)
    print(json.dumps({"counts": totals, "findings": findings}, indent=1))
    return 1 if findings else 0


def atheris_mode(extra: list[str]) -> int:
    import atheris

    sys.path.insert(0, str(TESTS))
    with atheris.instrument_imports():
        import phimlx.config  # noqa: F401
        import phimlx.gguf  # noqa: F401
        import phimlx.tokenizer  # noqa: F401
    import craft
    import test_fuzz_gguf as fz

    workdir = Path(tempfile.mkdtemp(prefix="phimlx-atheris-", dir="/dev/shm"))
    path = workdir / "x.gguf"
    fz.warm_up(path, ["numpy"])
    seeds_dir = workdir / "corpus"
    seeds_dir.mkdir()
    for s in fz.make_seeds():
        (seeds_dir / s.name).write_bytes(s.data)

    def one(data: bytes) -> None:
        path.write_bytes(data)
        with craft.time_bound(fz.EXAMPLE_TIMEOUT):
            fz.check(path, ["numpy"])  # anything but GGUFError propagates: a finding

    if not any(e.startswith("-artifact_prefix") for e in extra):
        extra = [*extra, f"-artifact_prefix={workdir}/"]  # crash files: not in the cwd
    print(f"corpus and crash files: {workdir}", file=sys.stderr)
    atheris.Setup([sys.argv[0], str(seeds_dir), *extra], one)
    atheris.Fuzz()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--examples", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--chunk", type=int, default=2_000, help="files per child process")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--atheris", action="store_true", help="coverage-guided with atheris")
    args, extra = ap.parse_known_args()
    return atheris_mode([e for e in extra if e != "--"]) if args.atheris else random_mode(args)


if __name__ == "__main__":
    sys.exit(main())
