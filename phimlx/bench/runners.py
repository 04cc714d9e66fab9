"""The measuring side of the benchmark: one engine, one model, one repetition, one process.

The orchestrator (`phimlx.bench.cli`) starts ``python -m phimlx.bench.runners '<job json>'``
once per engine and repetition, so that one engine's memory never shows in another's
figures.  The child loads the model, warms up, measures, and writes one JSON object to its
standard output; everything the libraries print goes to standard error.

Every engine is driven with token ids, never text (llama-bench's conventions): a fixed
random prompt of ``pp`` tokens in one fresh context (prompt processing, and time to first
token = that prefill plus an argmax over its logits), then ``tg`` fixed random tokens fed one
at a time into another fresh context (generation).  Nothing is sampled, so EOS cannot end a
run early: the token counts are exact, and each run reports the positions its cache holds.

At a depth d (llama-bench's ``-d``) each of those contexts first holds d fixed random tokens,
prefilled untimed.  A batched decode (``--batch``) opens B sequences, prefills each with its
own short prompt (untimed) and times ``tg`` steps that advance all B at once (the backend
protocol's `step_batch`; llama.cpp's `llama_decode` with B sequence ids), each sequence fed
its own greedy next token.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# Engine names: ours are phimlx backends, the others are the peers people would otherwise use.
OURS = ("numpy", "mlx")
PEERS = ("llama.cpp", "mlx-lm", "transformers")
ENGINES = OURS + PEERS

WARMUP_PROMPT = 32  # llama-bench warms up with a short prompt and one generated token
WARMUP_STEPS = 2
BATCH_PROMPT = 16  # tokens each sequence of a batched decode is prefilled with


def depth_token_ids(n_vocab: int, n: int, seed: int) -> list[int]:
    """The fixed random ids a context is filled with before a measurement at depth ``n``
    (made in the runner from the seed: a long depth would not fit in a command line)."""
    return np.random.default_rng([seed, 1]).integers(0, n_vocab, n).tolist()


def batch_prompts(n_vocab: int, batch: int, seed: int) -> list[list[int]]:
    """The fixed random prompts of the ``batch`` sequences of a batched decode, one each."""
    rng = np.random.default_rng([seed, 2])
    return rng.integers(0, n_vocab, (batch, BATCH_PROMPT)).tolist()


class Adapter(Protocol):
    """What `measure` needs from an engine: a context to fill, one token or many at a time."""

    def reset(self) -> None:
        """Start a fresh, empty context."""
        ...

    def prefill(self, ids: Sequence[int]) -> Any:
        """Process ``ids`` (batched) and return the last position's logits, computed."""
        ...

    def decode(self, ids: Sequence[int]) -> None:
        """Feed ``ids`` one at a time (one forward pass each), logits computed every step."""
        ...

    @property
    def position(self) -> int:
        """Tokens held in the context."""
        ...


def measure(
    adapter: Adapter,
    pp_ids: Sequence[int],
    tg_ids: Sequence[int],
    *,
    warmup: bool = True,
    depths: Sequence[int] = (0,),
    depth_ids: Sequence[int] = (),
) -> dict[str, Any]:
    """Time prompt processing and generation on ``adapter``, at each depth.

    Args:
        depths: llama-bench's ``-d``: at depth d the context already holds the first d of
            ``depth_ids`` (prefilled, not timed) when the prompt or the first generated
            token goes in.  The warm-up runs at depth 0, as llama-bench's does.

    Returns:
        ``pp_tokens``, ``pp_s``, ``ttft_s``, ``pp_position``, ``first_token``, ``tg_tokens``,
        ``tg_s``, ``tg_position`` (positions as reported by the engine's own cache) and
        ``depth``, all at ``depths[0]``; under ``depths``, one such dict per depth.

    Raises:
        ValueError: a depth longer than ``depth_ids``.
    """
    if max(depths, default=0) > len(depth_ids):
        raise ValueError(f"depth {max(depths)} needs as many depth ids; {len(depth_ids)} given")
    if warmup:
        adapter.reset()
        if pp_ids:
            adapter.prefill(list(pp_ids[:WARMUP_PROMPT]))
        if tg_ids:
            adapter.decode(list(tg_ids[:WARMUP_STEPS]))
    rows = []
    for depth in depths:
        row: dict[str, Any] = {"depth": depth}
        if pp_ids:
            _fill(adapter, depth_ids[:depth])
            t0 = time.perf_counter()
            logits = adapter.prefill(list(pp_ids))
            t1 = time.perf_counter()
            first = int(np.argmax(np.asarray(logits, dtype=np.float32).reshape(-1)))
            t2 = time.perf_counter()
            row.update(
                pp_tokens=len(pp_ids),
                pp_s=t1 - t0,
                ttft_s=t2 - t0,
                pp_position=adapter.position,
                first_token=first,
            )
        if tg_ids:
            _fill(adapter, depth_ids[:depth])
            t0 = time.perf_counter()
            adapter.decode(list(tg_ids))
            t1 = time.perf_counter()
            row.update(tg_tokens=len(tg_ids), tg_s=t1 - t0, tg_position=adapter.position)
        rows.append(row)
    return {**rows[0], "depths": rows}


def _fill(adapter: Adapter, ids: Sequence[int]) -> None:
    """A fresh context holding ``ids`` (the depth), prefilled untimed."""
    adapter.reset()
    if len(ids):
        adapter.prefill(list(ids))


class BatchAdapter(Protocol):
    """What `measure_batch` needs: B sequences, stepped together."""

    def start(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Fresh sequences, one per prompt, each prefilled with it; float32 logits (B, vocab)
        of each prompt's last token."""
        ...

    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        """Append ``token_ids[b]`` to sequence b, all in one forward pass; logits (B, vocab)."""
        ...

    def rewind(self, n: int) -> None:
        """Forget every sequence's positions ``n`` and later."""
        ...

    def positions(self) -> list[int]:
        """Tokens each sequence holds, as the engine's cache reports them."""
        ...


class BatchUnsupported(Exception):
    """This engine has no batched decode here; the message says why."""


def measure_batch(
    adapter: BatchAdapter,
    sizes: Sequence[int],
    prompts: Sequence[Sequence[int]],
    tg: int,
    *,
    warmup: bool = True,
) -> list[dict[str, Any]]:
    """Time ``tg`` batched steps of B sequences, for each B in ``sizes``.

    Each sequence is prefilled with its own prompt (untimed), then every step feeds each
    sequence its own greedy next token (the argmax of its logits, timed with the step).
    The warm-up steps are forgotten (`BatchAdapter.rewind`) before the timed ones.

    Returns:
        One dict per B: ``batch``, ``tg_tokens`` (per sequence), ``tg_s``, ``positions``,
        ``first_tokens`` (the greedy token after each prompt) and ``last_tokens``.
    """
    rows = []
    for b in sizes:
        logits = adapter.start(prompts[:b])
        toks = firsts = np.argmax(logits, axis=1)
        if warmup:
            for _ in range(WARMUP_STEPS):
                adapter.step(toks.tolist())
            adapter.rewind(len(prompts[0]))
        t0 = time.perf_counter()
        for _ in range(tg):
            toks = np.argmax(adapter.step(toks.tolist()), axis=1)
        t1 = time.perf_counter()
        rows.append(
            {
                "batch": b,
                "tg_tokens": tg,
                "tg_s": t1 - t0,
                "positions": adapter.positions(),
                "first_tokens": firsts.tolist(),  # each prompt's greedy next token
                "last_tokens": toks.tolist(),
            }
        )
    return rows


# -- ours: any phimlx backend through the incremental-decode protocol --------------------------


class PhimlxAdapter:
    """A phimlx backend session (`phimlx.backends.Session`): the interface users get."""

    def __init__(self, loaded: Any, max_context: int) -> None:
        self.loaded = loaded
        self.max_context = max_context
        self.session = loaded.new_session(max_context)

    def reset(self) -> None:
        self.session.reset()

    def prefill(self, ids: Sequence[int]) -> Any:
        return self.session.prefill(ids)

    def decode(self, ids: Sequence[int]) -> None:
        step = self.session.step
        for i in ids:
            step(i)

    @property
    def position(self) -> int:
        return int(self.session.position)


class PhimlxBatch:
    """B sessions of one phimlx model, stepped by `LoadedModel.step_batch`."""

    def __init__(self, loaded: Any, max_context: int) -> None:
        if not callable(getattr(loaded, "step_batch", None)):
            raise BatchUnsupported(
                f"{type(loaded).__name__} has no step_batch (the batched step of the backend "
                "protocol); this phimlx version cannot decode a batch"
            )
        self.loaded, self.max_context = loaded, max_context
        self.sessions: list[Any] = []

    def start(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        self.sessions = []  # the previous batch's caches go first
        self.sessions = [self.loaded.new_session(self.max_context) for _ in prompts]
        return np.stack([s.prefill(list(p)) for s, p in zip(self.sessions, prompts, strict=True)])

    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.loaded.step_batch(self.sessions, token_ids)

    def rewind(self, n: int) -> None:
        for s in self.sessions:
            s.trim(n)

    def positions(self) -> list[int]:
        return [int(s.position) for s in self.sessions]


def _load_phimlx(engine: str, path: str, threads: int, max_context: int) -> tuple[Any, dict]:
    from phimlx import backends
    from phimlx.config import ModelConfig
    from phimlx.gguf import open_gguf

    name, _ = backends.choose(engine)
    if Path(path).is_dir():  # an mlx-lm / Hugging Face safetensors folder
        from phimlx.formats import open_checkpoint

        mf = open_checkpoint(path)
        config = mf.config
    else:
        mf = open_gguf(path)
        config = ModelConfig.from_gguf(mf)
    if name == "numpy":
        import fallback

        # `measure` warms every engine up itself: the load time stays the time to load,
        # as it is for the peers, not that plus the backend's own warm-up pass.
        loaded = fallback.load(mf, config, threads=threads, warmup=False)
    else:
        loaded = backends.load_backend(name, mf, config, threads=threads)
    info: dict[str, Any] = {}
    if engine == "numpy":
        try:
            from fallback.kernels import numba_available

            info["numba_kernels"] = bool(numba_available())
        except ImportError:
            info["numba_kernels"] = False
        info["threads_in_effect"] = getattr(loaded, "threads", None)
        mats = loaded._matrices() if hasattr(loaded, "_matrices") else []
        info["int8_activations"] = any(m.int8_activations for m in mats)
    return PhimlxAdapter(loaded, max_context), info


# -- llama.cpp through llama-cpp-python's low-level API ---------------------------------------

_LLAMA_LOG_CB: Any = None


def _no_flash_attention(cp: Any) -> None:
    """Flash attention off, as llama-bench's default (``-fa 0``) and llama-cpp-python's
    `Llama` have it; the C default (auto: on, on the CPU) decodes several times slower at
    depth on the machines measured here."""
    if hasattr(cp, "flash_attn_type"):
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    elif hasattr(cp, "flash_attn"):
        cp.flash_attn = False


class LlamaCppAdapter:
    """llama.cpp's own decode calls (`llama_decode`), as llama-bench drives them."""

    def __init__(self, path: str, threads: int, max_context: int, n_batch: int) -> None:
        import llama_cpp as ll

        self.ll = ll
        self.n_batch = n_batch
        ll.llama_backend_init()
        self._silence()
        mp = ll.llama_model_default_params()
        mp.use_mmap = True  # as ours: weights stay in the page cache
        self.model = ll.llama_model_load_from_file(os.fsencode(path), mp)
        if not self.model:
            raise RuntimeError(
                f"llama.cpp could not load {path} (run with --verbose to see its log); a GGUF "
                "without tokenizer metadata cannot be loaded by llama.cpp"
            )
        cp = ll.llama_context_default_params()
        cp.n_ctx = max_context
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.no_perf = True
        _no_flash_attention(cp)
        self.ctx = ll.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {max_context} tokens")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.mem = ll.llama_get_memory(self.ctx)

    def _silence(self) -> None:
        global _LLAMA_LOG_CB
        if os.environ.get("PHIMLX_BENCH_VERBOSE") or _LLAMA_LOG_CB is not None:
            return

        @self.ll.llama_log_callback
        def _quiet(level: int, text: bytes, user_data: Any) -> None:
            return None

        _LLAMA_LOG_CB = _quiet  # module-level: llama.cpp keeps calling it for ever
        self.ll.llama_log_set(_LLAMA_LOG_CB, None)

    def reset(self) -> None:
        self.ll.llama_memory_clear(self.mem, True)

    def _decode(self, ids: Sequence[int]) -> None:
        ll = self.ll
        arr = (ll.llama_token * len(ids))(*ids)
        rc = ll.llama_decode(self.ctx, ll.llama_batch_get_one(arr, len(ids)))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def prefill(self, ids: Sequence[int]) -> Any:
        for i in range(0, len(ids), self.n_batch):
            self._decode(ids[i : i + self.n_batch])
        self.ll.llama_synchronize(self.ctx)
        ptr = self.ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def decode(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._decode([i])
            self.ll.llama_synchronize(self.ctx)

    @property
    def position(self) -> int:
        return int(self.ll.llama_memory_seq_pos_max(self.mem, 0)) + 1


class LlamaCppBatch:
    """B sequences in one llama.cpp context (``n_seq_max = B``), stepped by one
    `llama_decode` of a `llama_batch` holding one token of each sequence id."""

    def __init__(self, single: LlamaCppAdapter, threads: int, per_seq: int, max_b: int) -> None:
        ll = self.ll = single.ll
        self.n_vocab = single.n_vocab
        cp = ll.llama_context_default_params()
        cp.n_seq_max = max_b
        cp.n_ctx = per_seq * max_b  # each sequence gets per_seq positions of its own
        cp.n_batch = cp.n_ubatch = max(max_b, BATCH_PROMPT, 32)
        cp.n_threads = cp.n_threads_batch = threads
        cp.no_perf = True
        _no_flash_attention(cp)
        self.ctx = ll.llama_init_from_model(single.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {max_b} sequences")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(int(cp.n_batch), 0, 1)
        self.pos: list[int] = []

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One `llama_decode` of (token, position, sequence id, wants logits) entries."""
        ll, b = self.ll, self.batch
        for i, (tok, pos, seq, out) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = ll.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode of a batch returned {rc}")

    def _logits(self, i: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def start(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        self.ll.llama_memory_clear(self.mem, True)
        rows = []
        for seq, prompt in enumerate(prompts):
            n = len(prompt)
            self._decode([(int(t), i, seq, i == n - 1) for i, t in enumerate(prompt)])
            rows.append(self._logits(n - 1).copy())
        self.pos = [len(p) for p in prompts]
        return np.stack(rows)

    def step(self, token_ids: Sequence[int]) -> np.ndarray:
        self._decode([(int(t), self.pos[s], s, True) for s, t in enumerate(token_ids)])
        self.pos = [p + 1 for p in self.pos]
        return np.stack([self._logits(s) for s in range(len(token_ids))])

    def rewind(self, n: int) -> None:
        for seq in range(len(self.pos)):
            if not self.ll.llama_memory_seq_rm(self.mem, seq, n, -1):
                raise RuntimeError(f"llama.cpp could not drop sequence {seq}'s positions >= {n}")
        self.pos = [n] * len(self.pos)

    def positions(self) -> list[int]:
        ll = self.ll
        return [int(ll.llama_memory_seq_pos_max(self.mem, s)) + 1 for s in range(len(self.pos))]

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)


# -- mlx-lm: its own model classes and its own generation loop --------------------------------


def mlx_lm_folder(path: str) -> Path:
    """The mlx-lm model folder `phimlx convert` makes of ``path``, converted once and cached.

    mlx-lm cannot read GGUF; converting is how its users run such a file, and our converter
    keeps the GGUF blocks (no float detour), so both engines compute with the same weights.
    """
    import mlx.core as mx

    from phimlx.mlx.convert import convert

    # The MLX backend's own choice: float16 scales on Metal, float32 on the CPU (where
    # float16 matmuls are slow).
    dtype = "float16" if mx.metal.is_available() else "float32"
    src = Path(path)
    if src.is_dir():  # already a model folder: mlx-lm reads it as it is
        return src
    st = src.stat()
    base = Path(os.environ.get("PHIMLX_SYNTHETIC_DIR") or Path.home() / ".cache" / "phimlx")
    out = base / "mlx-lm" / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}-{dtype}"
    if not (out / "config.json").exists():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        convert(src, tmp, dtype=dtype, tokenizer=False)
        os.replace(tmp, out)
    return out


class MlxLmAdapter:
    """mlx-lm's `generate_step` (its prefill and its pipelined decode loop), fed fixed ids."""

    def __init__(self, path: str) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.models.cache import make_prompt_cache

        self.mx = mx
        self.generate_step = generate_step
        self.make_cache = make_prompt_cache
        from mlx_lm.utils import load_model

        self.model, _ = load_model(mlx_lm_folder(path))
        self.cache: list[Any] = []

    def reset(self) -> None:
        self.cache = self.make_cache(self.model)

    def _run(self, prompt: Sequence[int], feed: Sequence[int]) -> Any:
        """mlx-lm's loop: prefill ``prompt``, then ``len(feed)`` steps fed ``feed`` as if
        sampled; returns the last logprobs, computed (one forward per token, no more)."""
        mx = self.mx
        queue = [mx.array([i], dtype=mx.uint32) for i in feed]
        seen: list[Any] = []

        def sampler(logprobs: Any) -> Any:
            seen.append(logprobs)  # evaluated by generate_step's async_eval
            return queue[min(len(seen) - 1, len(queue) - 1)] if queue else logprobs.argmax(-1)

        for _ in self.generate_step(
            mx.array(list(prompt), dtype=mx.uint32),
            self.model,
            max_tokens=len(feed),
            sampler=sampler,
            prompt_cache=self.cache,
        ):
            pass
        mx.eval(seen[-1])  # the last step was only launched (async_eval): wait for it
        return seen[-1]

    def prefill(self, ids: Sequence[int]) -> Any:
        return np.array(self._run(ids, []), dtype=np.float32)

    def decode(self, ids: Sequence[int]) -> None:
        self._run(ids[:1], ids[1:])

    @property
    def position(self) -> int:
        return int(self.cache[0].offset) if self.cache else 0


# -- transformers: GGUF loading (dequantized to float32) and torch on the CPU -----------------


class TransformersAdapter:
    """A transformers model loaded with ``gguf_file=`` (weights dequantized to float32)."""

    def __init__(self, path: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, DynamicCache

        torch.set_num_threads(threads)
        self.torch = torch
        self.cache_cls = DynamicCache
        p = os.path.abspath(path)
        self.model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(p), gguf_file=os.path.basename(p)
        ).eval()
        self.cache: Any = None
        self.dtype = str(self.model.dtype)

    def reset(self) -> None:
        self.cache = self.cache_cls()

    def _forward(self, ids: Sequence[int], keep: int | None) -> Any:
        torch = self.torch
        extra = {"logits_to_keep": keep} if keep else {}
        with torch.inference_mode():
            out = self.model(
                input_ids=torch.tensor([list(ids)], dtype=torch.long),
                past_key_values=self.cache,
                use_cache=True,
                **extra,
            )
        self.cache = out.past_key_values
        return out.logits[0, -1]

    def prefill(self, ids: Sequence[int]) -> Any:
        return self._forward(ids, keep=1).float().numpy()  # as generate(): last logits only

    def decode(self, ids: Sequence[int]) -> None:
        for i in ids:
            self._forward([i], keep=None)

    @property
    def position(self) -> int:
        return int(self.cache.get_seq_length()) if self.cache is not None else 0


# -- machine read bandwidth ------------------------------------------------------------------


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> tuple[float, str]:
    """Best read bandwidth in bytes/s summing a ``mib`` MiB array with ``threads`` threads.

    Returns:
        ``(bytes_per_second, method)``; the method is a numba parallel sum where numba
        works, else NumPy reductions on a thread pool (slower: a lower bound).
    """
    a = np.ones(mib * 2**20 // 8, dtype=np.float64)  # touched: pages are resident
    try:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=False)
        def total(x: np.ndarray) -> float:  # pragma: no cover - compiled
            acc = 0.0
            for i in numba.prange(x.size):
                acc += x[i]
            return acc

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        total(a[:1024])
        run: Callable[[], object] = lambda: total(a)  # noqa: E731
        method = "numba parallel sum"
    except Exception:  # noqa: BLE001 - numba missing or broken: fall back to NumPy
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads)
        parts = np.array_split(a.view(np.int64), threads)
        run = lambda: list(pool.map(np.bitwise_xor.reduce, parts))  # noqa: E731
        method = "numpy xor-reduce on threads"
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best, method


# -- the child process -------------------------------------------------------------------------


def peak_rss() -> int | None:
    """Peak resident set size of this process, bytes."""
    from phimlx.generate import peak_rss as _peak

    return _peak()


def engine_version(engine: str) -> str | None:
    """The version of the library behind ``engine``."""
    from importlib import metadata

    dist = {
        "numpy": "phimlx",
        "mlx": "mlx",
        "llama.cpp": "llama-cpp-python",
        "mlx-lm": "mlx-lm",
        "transformers": "transformers",
    }[engine]
    if dist == "phimlx":
        from .machine import phimlx_version

        return phimlx_version()
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Load, warm up and measure one engine as ``job`` says (see `phimlx.bench.cli`)."""
    engine = job["engine"]
    if engine == "_bandwidth":
        bw, method = read_bandwidth(int(job["threads"]), int(job.get("mib", 512)))
        return {"ok": True, "engine": engine, "bytes_per_s": bw, "method": method}
    threads = int(job["threads"])
    pp_ids, tg_ids = list(job["pp_ids"]), list(job["tg_ids"])
    max_context = int(job["max_context"])
    result: dict[str, Any] = {
        "engine": engine,
        "threads": threads,
        "version": engine_version(engine),
    }
    t_import = time.perf_counter()
    if engine in ("llama.cpp",):
        import llama_cpp  # noqa: F401
    elif engine == "mlx-lm":
        import mlx_lm  # noqa: F401
    elif engine == "transformers":
        import torch  # noqa: F401
        import transformers  # noqa: F401
    t0 = time.perf_counter()
    result["import_s"] = t0 - t_import
    result["rss_before_load"] = _current_rss()
    info: dict[str, Any] = {}
    if engine in OURS:
        adapter, info = _load_phimlx(engine, job["model"], threads, max_context)
    elif engine == "llama.cpp":
        adapter = LlamaCppAdapter(job["model"], threads, max_context, int(job.get("n_batch", 512)))
    elif engine == "mlx-lm":
        adapter = MlxLmAdapter(job["model"])
    elif engine == "transformers":
        adapter = TransformersAdapter(job["model"], threads)
        info["dtype"] = adapter.dtype
    else:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    result["load_s"] = time.perf_counter() - t0
    warmup = bool(job.get("warmup", True))
    depths = [int(d) for d in job.get("depths", [0])]
    seed, n_vocab = int(job.get("seed", 0)), int(job.get("n_vocab", 0))
    depth_ids = depth_token_ids(n_vocab, max(depths), seed) if max(depths) else []
    result.update(
        measure(adapter, pp_ids, tg_ids, warmup=warmup, depths=depths, depth_ids=depth_ids)
    )
    result["peak_rss"] = peak_rss()  # before any batch: the single-sequence figure, as before
    sizes = [int(b) for b in job.get("batch", [])]
    if sizes:
        result.update(_run_batch(engine, adapter, sizes, len(tg_ids), n_vocab, seed, job))
    result["info"] = info
    result["ok"] = True
    return result


def _run_batch(
    engine: str,
    adapter: Adapter,
    sizes: list[int],
    tg: int,
    n_vocab: int,
    seed: int,
    job: dict[str, Any],
) -> dict[str, Any]:
    """``{"batch": rows}`` of `measure_batch`, or ``{"batch": [], "batch_skipped": why}``
    where the engine has no batched decode, ``"batch_error"`` where it failed."""
    per_seq = BATCH_PROMPT + WARMUP_STEPS + tg + 8
    try:
        if isinstance(adapter, PhimlxAdapter):
            batch: Any = PhimlxBatch(adapter.loaded, per_seq)
        elif isinstance(adapter, LlamaCppAdapter):
            batch = LlamaCppBatch(adapter, int(job["threads"]), per_seq, max(sizes))
        else:
            raise BatchUnsupported(
                f"not measured for {engine}: batched decode is measured for phimlx's backends "
                "and llama.cpp"
            )
        prompts = batch_prompts(n_vocab, max(sizes), seed)
        rows = measure_batch(batch, sizes, prompts, tg, warmup=bool(job.get("warmup", True)))
    except BatchUnsupported as e:
        return {"batch": [], "batch_skipped": str(e)}
    except Exception as e:  # noqa: BLE001 - the single-sequence figures stand; say what failed
        log.debug("batched decode failed", exc_info=True)
        return {"batch": [], "batch_error": f"{type(e).__name__}: {e}"}
    close = getattr(batch, "close", None)
    if close is not None:
        close()
    return {"batch": rows}


def _current_rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def child_main(argv: Sequence[str]) -> int:
    """Run the job given as JSON in ``argv[0]``; print the result as one JSON line."""
    # Libraries (and C code) may write to stdout: point fd 1 at stderr while working and
    # keep the real stdout for the result alone.
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    try:
        job = json.loads(argv[0])
        try:
            result = run_job(job)
        except Exception as e:  # noqa: BLE001 - reported to the parent, which explains it
            log.debug("runner failed", exc_info=True)
            result = {"ok": False, "engine": job.get("engine"), "error": f"{type(e).__name__}: {e}"}
    finally:
        sys.stdout.flush()
        os.dup2(real, 1)
        os.close(real)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    sys.exit(child_main(sys.argv[1:]))
