"""`phimlx bench`: tokens/s of every backend and peer, on one GGUF file, in one run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from phimlx.errors import PhimlxError

from . import machine, report
from .models import DEFAULT_MODEL, NAMES_HELP, ModelNameError, _progress, resolve
from .runners import BATCH_PROMPT, ENGINES, OURS, WARMUP_STEPS

log = logging.getLogger("phimlx.bench")

ALIASES = {
    "llama-cpp": "llama.cpp",
    "llamacpp": "llama.cpp",
    "llama_cpp": "llama.cpp",
    "mlx_lm": "mlx-lm",
    "mlxlm": "mlx-lm",
    "hf": "transformers",
    "torch": "transformers",
}
SCHEMA = "phimlx.bench/1"


def build_parser() -> argparse.ArgumentParser:
    """The `phimlx bench` command line."""
    from phimlx.cli import ArgumentParser, HelpFormatter

    p = ArgumentParser(
        prog="phimlx bench",
        description="Prompt and generation tokens/s, time to first token, load time, peak "
        "memory and achieved bandwidth of phimlx's backends and of llama.cpp, mlx-lm and "
        "transformers, on the same GGUF file and thread count (llama-bench's conventions).",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "model_pos",
        nargs="?",
        metavar="MODEL",
        help="the model, as --model (so that `phimlx bench MODEL ...` works too)",
    )
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=NAMES_HELP)
    p.add_argument(
        "--vs",
        metavar="MODEL",
        help="a second model run in the same alternation and table, each row naming its "
        "file: the same model as an MLX or Hugging Face folder beside its GGUF, or another "
        "quantization (engines that cannot read it are skipped)",
    )
    p.add_argument(
        "-b",
        "--backends",
        default="auto",
        metavar="LIST",
        help="comma-separated engines among numpy, mlx, llama.cpp, mlx-lm, "
        "transformers; 'auto': every one installed, except MLX engines "
        "off Apple Silicon and transformers where its float32 copy does not fit",
    )
    p.add_argument("--pp", type=int, default=512, metavar="N", help="prompt tokens")
    p.add_argument("--tg", type=int, default=128, metavar="N", help="generated tokens")
    p.add_argument(
        "-d",
        "--depth",
        type=_int_list(0),
        default="0",
        metavar="LIST",
        help="comma-separated context depths, as llama-bench's -d: pp and tg measured with "
        "that many random tokens already in the cache (prefilled, not timed); depth + pp + tg "
        "must fit in the model's context",
    )
    p.add_argument(
        "--batch",
        type=_int_list(1),
        default=[],
        metavar="LIST",
        help="comma-separated batch sizes B: B sequences (each prefilled with its own "
        f"{BATCH_PROMPT}-token prompt) decoded together for tg steps, greedy tokens; reports "
        "aggregate and per-sequence tok/s and the ratio to B=1 (always measured too); "
        "phimlx backends and llama.cpp",
    )
    p.add_argument(
        "-r", "--repetitions", type=int, default=5, metavar="N", help="runs of each engine"
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        default=None,
        help="CPU threads for every engine (default: physical cores). No short form: -t is "
        "--temperature in phimlx generate and chat",
    )
    p.add_argument("--n-batch", type=int, default=512, metavar="N", help="llama.cpp batch size")
    p.add_argument(
        "--seed", type=int, default=1234, metavar="N", help="seed of the random token ids"
    )
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the warm-up pass in each runner",
    )
    p.add_argument(
        "--bandwidth-mib",
        type=int,
        default=512,
        metavar="MIB",
        help="size of the array the bandwidth test reads, MiB",
    )
    p.add_argument(
        "--no-bandwidth",
        dest="bandwidth",
        action="store_false",
        help="do not measure the machine's read bandwidth",
    )
    p.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write the full result as JSON to PATH ('-' or no PATH: to stdout "
        "instead of the table)",
    )
    p.add_argument("--plot", metavar="PNG", help="bar chart of tokens/s (needs matplotlib)")
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="seconds one runner may take before it is stopped",
    )
    p.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="where synthetic models are kept (default "
        "$PHIMLX_SYNTHETIC_DIR or ~/.cache/phimlx/synthetic)",
    )
    p.add_argument(
        "--no-progress", dest="progress", action="store_false", help="no progress bar on stderr"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="diagnostics on stderr")
    return p


def _int_list(low: int) -> Callable[[str], list[int]]:
    """An argparse type: ``"0,1024,4096"`` -> ``[0, 1024, 4096]`` (each >= ``low``, in the
    order given, repeats dropped)."""

    def parse(text: str) -> list[int]:
        out: list[int] = []
        for part in text.split(","):
            try:
                value = int(part.strip())
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"{text!r} is not a comma-separated list of integers"
                ) from None
            if value < low:
                raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= {low}")
            if value not in out:
                out.append(value)
        return out

    return parse


def batch_sizes(requested: list[int]) -> list[int]:
    """The batch sizes to measure: those requested, increasing, with 1 (the ratios' base)."""
    return sorted({1, *requested}) if requested else []


def check_fits(model_context: int, pp: int, tg: int, depths: list[int], batch: list[int]) -> None:
    """Raise `ValueError` unless every measurement fits in the model's context, before
    anything runs: a prompt or generation, depth + pp + tg (llama-bench sizes its context
    so), a batched sequence's prompt + warm-up + tg."""
    if pp + 2 > model_context or tg + 2 > model_context:
        raise ValueError(
            f"--pp {pp} / --tg {tg} do not fit in the model's context of {model_context} tokens"
        )
    deepest = max(depths)
    if deepest + pp + tg > model_context:
        raise ValueError(
            f"--depth {deepest} + --pp {pp} + --tg {tg} = {deepest + pp + tg} tokens do not "
            f"fit in the model's context of {model_context} tokens; lower the depth (at most "
            f"{max(model_context - pp - tg, 0)} with these --pp and --tg)"
        )
    if batch and BATCH_PROMPT + WARMUP_STEPS + tg > model_context:
        raise ValueError(
            f"a batched sequence ({BATCH_PROMPT}-token prompt + {WARMUP_STEPS} warm-up steps + "
            f"--tg {tg}) does not fit in the model's context of {model_context} tokens"
        )
    if batch and tg < 1:
        raise ValueError("--batch times tg steps: give --tg of at least 1")


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def _is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def availability(engine: str) -> str | None:
    """None if ``engine`` can run here, else why not."""
    if engine in OURS:
        from phimlx import backends

        try:
            return backends.probe(engine)
        except Exception as e:  # noqa: BLE001 - a half-installed backend is just unavailable
            return f"{type(e).__name__}: {e}"
    need = {
        "llama.cpp": ("llama_cpp",),
        "mlx-lm": ("mlx", "mlx_lm"),
        "transformers": ("transformers", "torch"),
    }[engine]
    if _installed(*need):
        return None
    pkg = {
        "llama.cpp": "llama-cpp-python",
        "mlx-lm": "mlx-lm",
        "transformers": "transformers torch gguf",
    }[engine]
    return f"not installed (pip install {pkg})"


def select_engines(spec: str, n_params: int) -> tuple[list[str], dict[str, str]]:
    """The engines to run for ``--backends spec``, and the ones skipped with the reason.

    Raises:
        ValueError: an unknown name, or a named engine that cannot run here.
    """
    if spec.strip().lower() in ("auto", "all", ""):
        chosen, skipped = [], {}
        for e in ENGINES:
            why = availability(e)
            if why is None and e in ("mlx", "mlx-lm") and not _is_apple_silicon():
                why = "MLX on a CPU is for tests (name it in --backends to run it anyway)"
            if why is None and e == "transformers":
                need, have = 4 * n_params, machine.total_ram() or 0
                if have and need > have // 2:
                    why = (
                        f"its float32 copy needs ~{need / 2**30:.0f} GiB "
                        f"(name it in --backends to run it anyway)"
                    )
            if why is None:
                chosen.append(e)
            else:
                skipped[e] = why
        return chosen, skipped
    chosen = []
    for raw in spec.split(","):
        name = ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if not name:
            continue
        if name not in ENGINES:
            raise ValueError(
                f"unknown engine {raw.strip()!r}; choose from {', '.join(ENGINES)} (or auto)"
            )
        why = availability(name)
        if why is not None:
            raise ValueError(f"engine {name} cannot run here: {why}")
        if name not in chosen:
            chosen.append(name)
    return chosen, {}


def token_ids(n_vocab: int, pp: int, tg: int, seed: int) -> tuple[list[int], list[int]]:
    """The fixed random prompt and generation ids (the same for every engine and run)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, n_vocab, pp).tolist(), rng.integers(0, n_vocab, tg).tolist())


def runner_env(threads: int) -> dict[str, str]:
    """The environment of a runner: thread pools capped at ``threads``, phimlx importable."""
    env = dict(os.environ)
    for var in (
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
        "NUMBA_NUM_THREADS",
    ):
        env[var] = str(threads)
    root = str(Path(__file__).resolve().parents[2])  # the directory holding phimlx/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_child(job: dict[str, Any], *, timeout: float, verbose: bool = False) -> dict[str, Any]:
    """Run one job in a fresh ``python -m phimlx.bench.runners`` process; its JSON result."""
    cmd = [sys.executable, "-m", "phimlx.bench.runners", json.dumps(job)]
    env = runner_env(int(job["threads"]))
    if verbose:
        env["PHIMLX_BENCH_VERBOSE"] = "1"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "engine": job["engine"],
            "error": f"timed out after {timeout:.0f} s (raise --timeout)",
        }
    if verbose and proc.stderr:
        sys.stderr.write(proc.stderr)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])
        return {
            "ok": False,
            "engine": job["engine"],
            "error": f"runner exited with code {proc.returncode} and no result: {tail}",
        }
    return result


def git_commit() -> str | None:
    """The phimlx source checkout's commit (``abc1234`` or ``abc1234+dirty``), if any.

    None for an installed copy, even one inside some other git work tree (a virtual
    environment in a project's folder): the checkout must be the folder holding phimlx/."""
    root = Path(__file__).resolve().parents[2]
    try:
        top = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--show-toplevel"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != root:
            return None
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            [
                "git",
                "-C",
                str(root),
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "phimlx",
                "fallback",
            ],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def source_version() -> str:
    """What the report names the code by: the checkout's commit, or, for an installed copy,
    its version (`machine.phimlx_version`)."""
    return git_commit() or machine.phimlx_version()


def measure_bandwidth(
    threads: int, timeout: float, verbose: bool, mib: int = 512
) -> dict[str, Any]:
    """Read bandwidth of this machine with 1 and ``threads`` threads (bytes/s), in runners."""
    out: dict[str, Any] = {}
    for t in sorted({1, threads}):
        r = run_child(
            {"engine": "_bandwidth", "threads": t, "mib": mib}, timeout=timeout, verbose=verbose
        )
        if r.get("ok"):
            out[str(t)] = {"bytes_per_s": r["bytes_per_s"], "method": r["method"]}
        else:
            log.warning("could not measure bandwidth with %d threads: %s", t, r.get("error"))
    return out


class Row(NamedTuple):
    """One row of the report: its key in ``result["engines"]`` (the engine's name, with
    ``[label]`` for the ``--vs`` model), the engine, and which model (0, or 1 for --vs)."""

    key: str
    engine: str
    model: int


def run_benchmark(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Everything but the output: resolve, select, measure, summarise."""
    model = resolve(args.model, cache_dir=args.cache_dir, progress=args.progress)
    depths, batch = list(args.depth), batch_sizes(args.batch)
    check_fits(model.context_length, args.pp, args.tg, depths, batch)
    models = [model]
    if args.vs:
        models.append(resolve(args.vs, cache_dir=args.cache_dir, progress=args.progress))
        check_fits(models[1].context_length, args.pp, args.tg, depths, batch)
    rows: list[Row] = []  # (key in the result, engine, model index)
    skipped: dict[str, str] = {}
    for i, m in enumerate(models):
        engines, why = select_engines(args.backends, m.n_params)
        if m.path.is_dir():  # a safetensors folder: the GGUF readers cannot run it
            for e in ("llama.cpp", "transformers"):
                if e in engines:
                    engines.remove(e)
                    why[e] = "reads GGUF files; this model is a safetensors folder"
        suffix = f" [{m.label}]" if i else ""
        rows += [Row(e + suffix, e, i) for e in engines]
        skipped.update({e + suffix: text for e, text in why.items()})
    if not rows:
        raise ValueError("no engine to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    threads = args.threads or machine.physical_cores() or os.cpu_count() or 1
    # ids every model can embed: the same prompt and tokens for both files
    pp_ids, tg_ids = token_ids(min(m.n_vocab for m in models), args.pp, args.tg, args.seed)
    info = machine.machine_info()
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "command": command,
        "version": machine.phimlx_version(),
        "commit": source_version(),
        "machine": info,
        "machine_line": machine.describe(info),
        "model": model.as_dict(),
        **({"vs_model": models[1].as_dict()} if args.vs else {}),
        "settings": {
            "pp": args.pp,
            "tg": args.tg,
            "repetitions": args.repetitions,
            "threads": threads,
            "n_batch": args.n_batch,
            "seed": args.seed,
            "warmup": args.warmup,
            "depth": depths,
            "batch": batch,
            "batch_prompt": BATCH_PROMPT,
        },
        "skipped": skipped,
    }
    result["machine_bandwidth"] = (
        measure_bandwidth(threads, args.timeout, args.verbose, args.bandwidth_mib)
        if args.bandwidth
        else {}
    )
    max_context = max(depths) + max(args.pp, args.tg, 64) + 8
    jobs = [
        {
            "model": str(m.path),
            "threads": threads,
            "pp_ids": pp_ids,
            "tg_ids": tg_ids,
            "max_context": min(max_context, m.context_length),
            "n_batch": args.n_batch,
            "warmup": args.warmup,
            "depths": depths,
            "batch": batch,
            "seed": args.seed,
            "n_vocab": m.n_vocab,
        }
        for m in models
    ]
    runs: dict[str, list[dict[str, Any]]] = {row.key: [] for row in rows}
    failed: set[str] = set()
    bar = _progress("bench", total=args.repetitions * len(rows)) if args.progress else None
    for rep in range(args.repetitions):
        k = rep % len(rows)  # rotate the order too: no engine always runs first
        for row in rows[k:] + rows[:k]:
            if row.key in failed:
                if bar is not None:
                    bar.update(1)
                continue
            if bar is not None:
                bar.set_postfix_str(f"{row.key} run {rep + 1}/{args.repetitions}")
            job = {**jobs[row.model], "engine": row.engine}
            r = run_child(job, timeout=args.timeout, verbose=args.verbose)
            r["repetition"] = rep
            runs[row.key].append(r)
            if not r.get("ok"):
                log.warning("%s failed: %s", row.key, r.get("error"))
                failed.add(row.key)  # a load failure would repeat: do not retry
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    bw = result["machine_bandwidth"].get(str(threads), {}).get("bytes_per_s")
    result["engines"] = {}
    for row in rows:
        got = runs[row.key]
        ok = [r for r in got if r.get("ok")]
        result["engines"][row.key] = {
            "engine": row.engine,
            **({"model": models[row.model].label} if row.model else {}),
            "version": (ok[0] if ok else got[0] if got else {}).get("version"),
            "summary": report.summarize(got, models[row.model].weight_bytes, bw),
            "runs": got,
        }
    summaries = {e: v["summary"] for e, v in result["engines"].items()}
    result["ratios_to_llama_cpp"] = report.ratios(summaries)
    result["ratios_to_llama_cpp_by_depth"] = {
        str(d): report.ratios({e: report.at_depth(s, d) or {} for e, s in summaries.items()})
        for d in depths
    }
    result["load_average_after"] = machine.load_average()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run `phimlx bench` with ``argv``; 0 if every engine ran, 1 if one failed, 2 on bad use."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `phimlx bench -- --model ...` hands the separator on
        argv = argv[1:]
    parser = build_parser()
    if "-t" in argv or any(a.startswith("-t") and a[2:3].isdigit() for a in argv):
        parser.error(
            "-t is not a bench option (in generate and chat it is --temperature); use --threads"
        )
    args = parser.parse_args(argv)
    if args.model_pos:
        args.model = args.model_pos
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(name)s: %(message)s",
    )
    limits = {"pp": 0, "tg": 0, "repetitions": 1, "threads": 1, "n_batch": 1, "bandwidth_mib": 1}
    for flag, low in limits.items():
        value = getattr(args, flag)
        if value is not None and value < low:
            opt = "--" + flag.replace("_", "-")
            print(
                f"phimlx bench: error: argument {opt}: {value} is invalid: must be >= {low}",
                file=sys.stderr,
            )
            return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "phimlx bench: error: --plot needs matplotlib, which is not installed: "
            "pip install matplotlib (or pip install 'phimlx[bench]')",
            file=sys.stderr,
        )
        return 2
    command = "phimlx bench " + shlex.join(argv)
    try:
        result = run_benchmark(args, command)
    except (PhimlxError, ModelNameError, ValueError, OSError) as e:
        print(f"phimlx bench: error: {e}", file=sys.stderr)
        return 2
    if args.json == "-":
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
    else:
        sys.stdout.write(report.markdown(result) + "\n")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        report.plot(result, args.plot)
        print(f"phimlx bench: plot written to {args.plot}", file=sys.stderr)
    failed = [e for e, v in result["engines"].items() if not v["summary"]["runs_ok"]]
    return 1 if failed else 0
