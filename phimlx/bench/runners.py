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
    adapter: Adapter, pp_ids: Sequence[int], tg_ids: Sequence[int], *, warmup: bool = True
) -> dict[str, Any]:
    """Time prompt processing and generation on ``adapter``.

    Returns:
        ``pp_tokens``, ``pp_s``, ``ttft_s``, ``pp_position``, ``first_token``, ``tg_tokens``,
        ``tg_s``, ``tg_position`` (positions as reported by the engine's own cache).
    """
    out: dict[str, Any] = {}
    if warmup:
        adapter.reset()
        if pp_ids:
            adapter.prefill(list(pp_ids[:WARMUP_PROMPT]))
        if tg_ids:
            adapter.decode(list(tg_ids[:WARMUP_STEPS]))
    if pp_ids:
        adapter.reset()
        t0 = time.perf_counter()
        logits = adapter.prefill(list(pp_ids))
        t1 = time.perf_counter()
        first = int(np.argmax(np.asarray(logits, dtype=np.float32).reshape(-1)))
        t2 = time.perf_counter()
        out.update(
            pp_tokens=len(pp_ids),
            pp_s=t1 - t0,
            ttft_s=t2 - t0,
            pp_position=adapter.position,
            first_token=first,
        )
    if tg_ids:
        adapter.reset()
        t0 = time.perf_counter()
        adapter.decode(list(tg_ids))
        t1 = time.perf_counter()
        out.update(tg_tokens=len(tg_ids), tg_s=t1 - t0, tg_position=adapter.position)
    return out


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


def _load_phimlx(engine: str, path: str, threads: int, max_context: int) -> tuple[Any, dict]:
    from phimlx import backends
    from phimlx.config import ModelConfig
    from phimlx.gguf import open_gguf

    name, _ = backends.choose(engine)
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
    result.update(measure(adapter, pp_ids, tg_ids, warmup=bool(job.get("warmup", True))))
    result["peak_rss"] = peak_rss()
    result["info"] = info
    result["ok"] = True
    return result


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
