"""Fuzzing the loader: mutated GGUF files give a valid model or a `GGUFError`.

Never another exception type, a crash, a hang, or an allocation beyond a bound
proportional to the file size.  Seeds are small valid models (llama and phi3, F32, F16 and
quantized weights, with and without a tokenizer); mutations are bit flips, interesting
bytes, structure-aware overwrites of counts / lengths / dims / type ids / offsets with
huge or off-by-one values, truncations, splices (copy, duplicate or delete byte ranges,
which duplicates and drops whole fields) and metadata type confusion.

Every file goes through what `phimlx.load` does, stage by stage: `open_gguf`,
`ModelConfig.from_gguf`, `Tokenizer.from_gguf`, the backend load, then a prefill and a step
on each available backend (NumPy; MLX when it runs here).

- CI: a bounded campaign runs in a subprocess (so a hard crash is seen as a dead child, with
  faulthandler's traceback and the file that did it), plus a hypothesis test in-process
  (shrinking).  Counts are printed in pytest's terminal summary.
- Longer: ``PHIMLX_FUZZ_EXAMPLES=100000 pytest tests/test_fuzz_gguf.py`` or
  ``python tests/fuzz_long.py`` (random campaign, optionally atheris).
- By hand: ``python tests/test_fuzz_gguf.py --examples 2000 --seed 7``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import faulthandler
import json
import logging
import os
import random
import subprocess
import sys
import traceback
import tracemalloc
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # when run as a script

import craft  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CI_EXAMPLES = int(os.environ.get("PHIMLX_FUZZ_EXAMPLES", "400"))
HYPOTHESIS_EXAMPLES = int(os.environ.get("PHIMLX_FUZZ_HYPOTHESIS", "60"))
EXAMPLE_TIMEOUT = 20.0  # seconds per file; generous: a hang, not a slow file, fails
TITLE = "GGUF fuzz"
pytestmark = pytest.mark.usefixtures("one_watchdog")  # (conftest)


# -- seeds ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seed:
    name: str
    data: bytes = field(repr=False)
    fields: tuple[craft.Field, ...] = field(repr=False)
    header_end: int = field(repr=False)


def _seed(name: str, g: craft.GGUF) -> Seed:
    data = g.build()
    fields, end = craft.walk(data)
    return Seed(name, data, tuple(fields), end)


def make_seeds() -> list[Seed]:
    return [
        _seed("llama-f32", craft.tiny_model("llama")),
        _seed("phi3-f32-tied", craft.tiny_model("phi3", tied=True, seed=1)),
        _seed("llama-q8_0-2layers", craft.tiny_model("llama", wtype=craft.Q8_0, n_layers=2)),
        _seed("phi3-q4_1", craft.tiny_model("phi3", wtype=craft.Q4_1, n_kv_heads=4)),
        _seed("llama-f16-notok", craft.tiny_model("llama", wtype=craft.F16, tokenizer=False)),
        _seed("phi3-q4_k", craft.tiny_model("phi3", wtype=craft.Q4_K, hidden=256, ffn=256)),
    ]


# -- mutations (each an op tuple, so hypothesis can draw them too) ---------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x20, 0x40)


def interesting_ints(old: int, size: int, file_size: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    vals = [0, 1, 2, 3, 4, 5, 7, 8, 13, 31, 32, 33, 255, 256, 0x7FFF, 0xFFFF, 0x7FFFFFFF,
            0x80000000, 0xFFFFFFFF, 1 << 32, (1 << 32) + 1, 1 << 61, (1 << 61) + 1, 1 << 62,
            1 << 63, top, top - 1, top - 31, file_size, file_size - 1, file_size + 1,
            old + 1, old - 1, old * 2, old << 32, old + 32, old - 32, old ^ (1 << 63)]  # fmt: skip
    return [v & top for v in vals]


def random_op(rng: random.Random, seed: Seed) -> tuple[Any, ...]:
    n = len(seed.data)
    # Mostly the header: the tensor data is just numbers to a parser.
    hpos = rng.randrange(seed.header_end) if rng.random() < 0.85 else rng.randrange(n)
    kind = rng.choices(
        ["flip", "byte", "field", "truncate", "copy", "dup", "delete", "junk", "retype"],
        weights=[20, 8, 30, 8, 8, 8, 8, 3, 7],
    )[0]
    if kind == "flip":
        return ("flip", hpos, rng.randrange(8))
    if kind == "byte":
        return ("byte", hpos, rng.choice(INTERESTING_BYTES))
    if kind == "field":
        f = rng.choice(seed.fields)
        old = int.from_bytes(seed.data[f.offset : f.offset + f.size], "little")
        return ("field", f.offset, f.size, rng.choice(interesting_ints(old, f.size, n)))
    if kind == "truncate":
        return ("truncate", hpos if rng.random() < 0.7 else rng.randrange(n))
    if kind in ("copy", "dup", "delete"):
        # Field-aligned ranges make whole entries move: a duplicated key, a lost tensor.
        a, b = sorted(rng.sample([f.offset for f in seed.fields], 2))
        return (kind, a, min(b - a, 4096), rng.randrange(seed.header_end))
    if kind == "junk":
        return ("junk", hpos, rng.randbytes(rng.choice([1, 4, 8, 64])))
    return ("retype", rng.randrange(1 << 16), rng.randrange(1 << 16))


def apply_ops(seed: Seed, ops: Sequence[tuple[Any, ...]]) -> bytes:
    data = bytearray(seed.data)
    for op in ops:
        kind = op[0]
        if not data:
            break
        if kind == "flip":
            data[op[1] % len(data)] ^= 1 << op[2]
        elif kind == "byte":
            data[op[1] % len(data)] = op[2]
        elif kind == "field":
            _, off, size, v = op
            if off + size <= len(data):
                data[off : off + size] = v.to_bytes(size, "little")
        elif kind == "truncate":
            del data[op[1] % len(data) :]
        elif kind == "copy":
            _, a, n, b = op
            data[b : b + n] = data[a : a + n]
        elif kind == "dup":
            _, a, n, b = op
            data[b:b] = data[a : a + n]
        elif kind == "delete":
            _, a, n, _b = op
            del data[a : a + n]
        elif kind == "junk":
            _, at, junk = op
            data[at:at] = junk
        elif kind == "retype":
            data = bytearray(_retype(seed, op[1], op[2]))
    return bytes(data)


_TYPED_VALUES: list[tuple[int, Any]] = [
    (craft.UINT32, 0), (craft.UINT32, 0xFFFFFFFF), (craft.INT32, -1), (craft.INT32, 1 << 30),
    (craft.UINT64, (1 << 64) - 1), (craft.INT64, -(1 << 63)), (craft.FLOAT32, float("nan")),
    (craft.FLOAT32, float("inf")), (craft.FLOAT64, -0.0), (craft.FLOAT32, 1e-45), (craft.BOOL, 1),
    (craft.UINT8, 0), (craft.INT8, -128), (craft.STRING, ""), (craft.STRING, "\ud800"),
    (craft.STRING, "x" * 300), (craft.ARRAY, (craft.UINT32, [])),
    (craft.ARRAY, (craft.UINT32, [4, 4])),
    (craft.ARRAY, (craft.STRING, ["a", "b"])), (craft.ARRAY, (craft.ARRAY, [(craft.INT8, [1])])),
    (craft.ARRAY, (craft.FLOAT32, [float("nan")] * 3)),
]  # fmt: skip


def _retype(seed: Seed, which: int, value: int) -> bytes:
    """Metadata type confusion: one key of the seed gets a value of another type (a vocab
    that is a string, a head count that is NaN, token ids that are arrays...)."""
    g = _SEED_MODELS[seed.name]()
    kv = g.kvs[which % len(g.kvs)]
    kv.vtype, kv.value = _TYPED_VALUES[value % len(_TYPED_VALUES)]
    kv.raw = None
    return g.build()


_SEED_MODELS = {
    "llama-f32": lambda: craft.tiny_model("llama"),
    "phi3-f32-tied": lambda: craft.tiny_model("phi3", tied=True, seed=1),
    "llama-q8_0-2layers": lambda: craft.tiny_model("llama", wtype=craft.Q8_0, n_layers=2),
    "phi3-q4_1": lambda: craft.tiny_model("phi3", wtype=craft.Q4_1, n_kv_heads=4),
    "llama-f16-notok": lambda: craft.tiny_model("llama", wtype=craft.F16, tokenizer=False),
    "phi3-q4_k": lambda: craft.tiny_model("phi3", wtype=craft.Q4_K, hidden=256, ffn=256),
}


def random_ops(rng: random.Random, seed: Seed) -> list[tuple[Any, ...]]:
    return [random_op(rng, seed) for _ in range(rng.choice([1, 1, 1, 2, 3]))]


# -- the check -----------------------------------------------------------------------------


def available_backends() -> list[str]:
    from phimlx import backends

    names = ["numpy"]
    if os.environ.get("PHIMLX_FUZZ_MLX", "1") == "1" and backends.probe("mlx") is None:
        names.append("mlx")
    return names


def check(path: Path, backend_names: Sequence[str]) -> str:
    """Everything `phimlx.load` does, stage by stage, then a prefill and a step.

    Returns ``"valid"`` (every stage passed) or ``"error"`` (some stage raised GGUFError).
    Any other exception propagates: that is a finding."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # overflow in random weights is fine
        return _check(path, backend_names)


def _check(path: Path, backend_names: Sequence[str]) -> str:
    from phimlx import backends
    from phimlx.config import ModelConfig
    from phimlx.errors import GGUFError
    from phimlx.gguf import open_gguf
    from phimlx.tokenizer import Tokenizer

    outcome = "valid"
    try:
        mf = open_gguf(path)
    except GGUFError:
        return "error"
    try:
        try:
            Tokenizer.from_gguf(mf)
        except GGUFError:
            outcome = "error"
        try:
            config = ModelConfig.from_gguf(mf)
        except GGUFError:
            return "error"
        for name in backend_names:
            try:
                loaded = backends.load_backend(name, mf, config, threads=1)
            except GGUFError:
                return "error"
            try:
                session = loaded.new_session(8)
                ids = [i % config.vocab_size for i in (1, 2, 3)]
                logits = session.prefill(ids)
                if len(logits) != config.vocab_size:
                    raise AssertionError(f"{name}: {len(logits)} logits")
                session.step(ids[0])
            finally:
                loaded.close()
    finally:
        mf.close()
    return outcome


def measured_check(path: Path, backend_names: Sequence[str]) -> tuple[str, int]:
    """`check` under the time bound; also the peak of traced allocation it made (tracemalloc
    must be on).  Raises `craft.Hang` on a hang."""
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    with craft.time_bound(EXAMPLE_TIMEOUT):
        outcome = check(path, backend_names)
    peak = tracemalloc.get_traced_memory()[1] - base
    if peak > craft.alloc_bound(path.stat().st_size):
        # A type the warm-up did not cover JIT-compiles a kernel once (numba's compiler
        # allocates megabytes): only a repeat on a warm process counts.
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        with craft.time_bound(EXAMPLE_TIMEOUT):
            check(path, backend_names)
        peak = tracemalloc.get_traced_memory()[1] - base
    return outcome, peak


def warm_up(path: Path, backend_names: Sequence[str]) -> None:
    """Lazy imports and JIT compilation for the seeds' types are not any file's doing."""
    for seed in make_seeds():
        path.write_bytes(seed.data)
        check(path, backend_names)


@dataclass
class Finding:
    index: int
    seed: str
    ops: list[Any]
    kind: str  # "foreign", "hang", "alloc"
    detail: str
    reproducer: str


def run_campaign(
    n: int, rng_seed: int, workdir: Path, backend_names: Sequence[str], *, log_every: int = 0
) -> tuple[collections.Counter[str], list[Finding]]:
    """Try ``n`` mutated files; count outcomes; save a reproducer for every finding.

    Before each check the file is at ``workdir/current.gguf`` and ``workdir/current.json``
    says what it is, so a hard crash of this process leaves its reproducer behind."""
    seeds = make_seeds()
    rng = random.Random(rng_seed)
    counts: collections.Counter[str] = collections.Counter()
    findings: list[Finding] = []
    current = workdir / "current.gguf"
    warm_up(current, backend_names)
    tracemalloc.start()
    try:
        for i in range(n):
            seed = rng.choice(seeds)
            ops = random_ops(rng, seed)
            data = apply_ops(seed, ops)
            current.write_bytes(data)
            (workdir / "current.json").write_text(
                json.dumps({"index": i, "seed": seed.name, "ops": _jsonable(ops)})
            )
            counts["files tried"] += 1
            kind, detail, peak = "", "", 0
            try:
                outcome, peak = measured_check(current, backend_names)
                counts["valid loads" if outcome == "valid" else "clean errors"] += 1
            except craft.Hang as e:
                kind, detail = "hang", str(e)
            except Exception as e:  # noqa: BLE001 - any other type is the finding
                kind = "foreign"
                detail = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
            if not kind and peak > craft.alloc_bound(len(data)):
                kind, detail = "alloc", f"{peak} bytes allocated for a {len(data)}-byte file"
            if kind:
                counts[{"hang": "hangs", "foreign": "foreign exceptions"}.get(kind, kind)] += 1
                repro = workdir / f"finding-{i}-{kind}.gguf"
                repro.write_bytes(data)
                findings.append(Finding(i, seed.name, _jsonable(ops), kind, detail, str(repro)))
            if log_every and (i + 1) % log_every == 0:
                print(f"{i + 1}/{n}: {dict(counts)}", file=sys.stderr, flush=True)
    finally:
        tracemalloc.stop()
    current.unlink(missing_ok=True)
    (workdir / "current.json").unlink(missing_ok=True)
    return counts, findings


def _jsonable(ops: Sequence[tuple[Any, ...]]) -> list[Any]:
    return [[x.hex() if isinstance(x, bytes) else x for x in op] for op in ops]


# -- CI: the bounded campaign in a subprocess -------------------------------------------------


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> craft.Tally:
    return craft.Tally.get(request.config, TITLE)


def test_fuzz_campaign_in_subprocess(tmp_path: Path, tally: craft.Tally) -> None:
    """CI_EXAMPLES mutated files through the whole loader in a child process: a segfault,
    an abort or a hang inside C code kills the child, not pytest, and is reported with the
    file that did it."""
    cmd = [sys.executable, "-X", "faulthandler", str(Path(__file__).resolve()),
           "--examples", str(CI_EXAMPLES), "--seed", os.environ.get("PHIMLX_FUZZ_SEED", "0"),
           "--workdir", str(tmp_path), "--json"]  # fmt: skip
    budget = 60 + CI_EXAMPLES * EXAMPLE_TIMEOUT / 10
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:
        tally.add("hangs")
        pytest.fail(f"the campaign hung ({budget} s); last file: {_current(tmp_path)}\n{e.stderr}")
    if proc.returncode not in (0, 1) or not proc.stdout.strip():
        tally.add("crashes")
        pytest.fail(
            f"the fuzz child died (exit {proc.returncode}); the file that crashed it: "
            f"{_current(tmp_path)}\nstderr:\n{proc.stderr[-4000:]}"
        )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    counts = collections.Counter(result["counts"])
    for k in ("files tried", "clean errors", "valid loads"):
        tally.add(k, counts[k])
    for k in ("crashes", "hangs", "foreign exceptions", "alloc"):
        tally.add(k, counts[k])
    tally.add(f"backends {'+'.join(result['backends'])}", 1)
    findings = result["findings"]
    assert not findings, json.dumps(findings[:5], indent=1)
    assert counts["files tried"] == CI_EXAMPLES
    # The mutations reach every stage: some files still load, most fail cleanly.
    assert counts["clean errors"] > CI_EXAMPLES // 4
    assert counts["valid loads"] > 0


def _current(workdir: Path) -> str:
    info = workdir / "current.json"
    return f"{workdir / 'current.gguf'} ({info.read_text() if info.exists() else '?'})"


# -- CI: hypothesis in-process (shrinks a failure to a minimal list of ops) -------------------

_SEEDS = make_seeds()


@st.composite
def mutated(draw: st.DrawFn) -> tuple[Seed, list[tuple[Any, ...]]]:
    seed = draw(st.sampled_from(_SEEDS))
    n = len(seed.data)
    pos = st.integers(0, seed.header_end - 1)
    field = st.sampled_from(seed.fields)

    @st.composite
    def field_op(d: st.DrawFn) -> tuple[Any, ...]:
        f = d(field)
        old = int.from_bytes(seed.data[f.offset : f.offset + f.size], "little")
        v = d(
            st.sampled_from(interesting_ints(old, f.size, n))
            | st.integers(0, (1 << 8 * f.size) - 1)
        )
        return ("field", f.offset, f.size, v)

    op = st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("byte"), pos, st.sampled_from(INTERESTING_BYTES)),
        field_op(),
        st.tuples(st.just("truncate"), st.integers(0, n - 1)),
        st.tuples(st.sampled_from(["copy", "dup", "delete"]), st.integers(0, seed.header_end),
                  st.integers(1, 512), st.integers(0, seed.header_end)),
        st.tuples(st.just("retype"), st.integers(0, 60), st.integers(0, len(_TYPED_VALUES) - 1)),
    )  # fmt: skip
    return seed, draw(st.lists(op, min_size=1, max_size=3))


@settings(max_examples=HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
@given(case=mutated())
def test_fuzz_hypothesis(
    case: tuple[Seed, list[tuple[Any, ...]]], request: pytest.FixtureRequest, warm: Path
) -> None:
    seed, ops = case
    tally = craft.Tally.get(request.config, TITLE + " (hypothesis, in-process)")
    data = apply_ops(seed, ops)
    path = warm / "h.gguf"
    path.write_bytes(data)
    tally.add("files tried")
    tracemalloc.start()
    try:
        outcome, peak = measured_check(path, ["numpy"])
    finally:
        tracemalloc.stop()
    tally.add("valid loads" if outcome == "valid" else "clean errors")
    assert peak <= craft.alloc_bound(len(data)), f"{peak} bytes for {len(data)}"


@pytest.fixture(scope="module")
def warm() -> Iterator[Path]:
    with craft.scratch_dir() as d:
        warm_up(d / "w.gguf", ["numpy"])
        yield d


def test_mutation_engine_is_deterministic() -> None:
    seeds = make_seeds()
    a = [apply_ops(s, random_ops(random.Random(5), s)) for s in seeds]
    b = [apply_ops(s, random_ops(random.Random(5), s)) for s in seeds]
    assert a == b and any(x != s.data for x, s in zip(a, seeds, strict=True))


def _main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Fuzz phimlx's GGUF loader (random mutations).")
    ap.add_argument("--examples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="reproducers go here")
    ap.add_argument("--backends", default=None, help="comma list (default: numpy, mlx if it runs)")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--log-every", type=int, default=0)
    args = ap.parse_args(argv)
    faulthandler.enable()
    logging.getLogger("phimlx").setLevel(logging.ERROR)  # corrupt files warn a lot
    names = args.backends.split(",") if args.backends else available_backends()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or stack.enter_context(craft.scratch_dir())
        workdir.mkdir(parents=True, exist_ok=True)
        # faulthandler's watchdog once for the campaign, not once a file (`craft.watchdog`)
        stack.enter_context(craft.watchdog(60 + 2 * args.examples * EXAMPLE_TIMEOUT))
        counts, findings = run_campaign(
            args.examples, args.seed, workdir, names, log_every=args.log_every
        )
        result = {"counts": dict(counts), "backends": names,
                  "findings": [f.__dict__ for f in findings]}  # fmt: skip
        if args.json:
            print(json.dumps(result))
        else:
            print(json.dumps(result, indent=1))
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(_main())
