"""Load test of `phimlx serve`: N concurrent OpenAI clients, streaming greedy requests.

Reports aggregate generated tokens/s, time to first token and inter-token latency
percentiles, the CPU time the clients and (``--start``) the server used meanwhile, and
(``--compare``) the wall time of K greedy requests run concurrently
against K run one after another (``--rounds`` alternating rounds: median and spread).
Every request generates exactly ``--max-tokens`` tokens (``ignore_eos``); each has its own
prompt (a shared opening, as chats share a system prompt, then its own question), so no
request is a whole-prompt cache hit of another.

Against a running server::

    phimlx serve --model smollm2-135m-instruct --port 8080 &
    python bench/serve.py --url http://127.0.0.1:8080 --clients 4 --requests 2 --compare

or let the script start one (on a free port) and stop it afterwards::

    python bench/serve.py --start smollm2-135m-instruct --clients 4 --compare

(options after ``--`` go to that server: ``... --compare -- --threads 1``).

The README's batching figure (4 concurrent greedy requests of 128 tokens, 4 in turn)::

    python bench/serve.py --start smollm2-135m-instruct --compare --max-tokens 128 \\
        --requests 1 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import openai

TOPICS = [
    "the ocean", "a mountain village", "an old clock", "a lost robot", "winter in Paris",
    "a lighthouse keeper", "the first day of school", "a hidden garden", "a chess match",
    "a long train journey", "a city at night", "a small bakery", "a storm at sea",
    "a forgotten library", "a desert caravan", "a jazz club",
]  # fmt: skip


@dataclass
class Timing:
    """One request, timed on the client."""

    start: float
    first: float | None = None  # first text received
    end: float = 0.0
    tokens: int = 0  # completion tokens (the server's usage)
    cached: int = 0  # prompt tokens the server reused
    arrivals: list[float] = field(default_factory=list)  # each text chunk's arrival

    @property
    def ttft(self) -> float:
        return (self.first or self.end) - self.start


def request_body(i: int, args: argparse.Namespace) -> dict:
    """Request ``i``: greedy, exactly ``args.max_tokens`` tokens, streamed (unless
    ``args.no_stream``: one response at the end)."""
    body = {
        "model": args.model_name,
        "messages": [{"role": "user", "content": f"Write a story about {TOPICS[i % len(TOPICS)]} "
                      f"(story {i})."}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }  # fmt: skip
    if not args.no_stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


def one_request(client: openai.OpenAI | httpx.Client, i: int, args: argparse.Namespace) -> Timing:
    """Request ``i`` through the `openai` client, or (an `httpx.Client`) read as plain
    server-sent events."""
    if isinstance(client, httpx.Client):
        return _raw_request(client, i, args)
    body = request_body(i, args)
    t = Timing(time.perf_counter())
    stream = client.chat.completions.create(**body, extra_body={"ignore_eos": True})
    if args.no_stream:  # (no first token to time: TTFT is the whole request)
        t.end = time.perf_counter()
        t.tokens = stream.usage.completion_tokens
        details = stream.usage.prompt_tokens_details
        t.cached = (details.cached_tokens or 0) if details else 0
        return t
    for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].delta.content:
            t.first = t.first or now
            t.arrivals.append(now)
        if chunk.usage is not None:
            t.tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            t.cached = (details.cached_tokens or 0) if details else 0
    t.end = time.perf_counter()
    return t


def _raw_request(client: httpx.Client, i: int, args: argparse.Namespace) -> Timing:
    """`one_request` with the events parsed by `json.loads` alone: the client's own work
    per token is a fraction of the `openai` package's (which builds a pydantic object per
    chunk), so on a machine whose cores the server uses too, less of it is measured."""
    t = Timing(time.perf_counter())
    body = {**request_body(i, args), "ignore_eos": True}
    if args.no_stream:
        response = client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        use = response.json()["usage"]
        t.end = time.perf_counter()
        t.tokens = use["completion_tokens"]
        t.cached = (use.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return t
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            choices = chunk.get("choices")
            if choices and choices[0]["delta"].get("content"):
                t.first = t.first or now
                t.arrivals.append(now)
            if chunk.get("usage"):
                t.tokens = chunk["usage"]["completion_tokens"]
                details = chunk["usage"].get("prompt_tokens_details") or {}
                t.cached = details.get("cached_tokens") or 0
    t.end = time.perf_counter()
    return t


def make_client(url: str, args: argparse.Namespace) -> openai.OpenAI | httpx.Client:
    """One client of ``args.client``'s kind for the server at ``url``."""
    if args.client == "httpx":
        auth = {} if args.api_key == "none" else {"Authorization": f"Bearer {args.api_key}"}
        return httpx.Client(base_url=url, headers=auth, timeout=3600)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=args.api_key, max_retries=0,
                         timeout=3600)  # fmt: skip


def process_cpu(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, all threads) used so far by this process, or by process
    ``pid`` (through psutil; None where psutil is missing or the process is gone)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        import psutil
    except ImportError:
        return None
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def run(
    url: str,
    args: argparse.Namespace,
    clients: int,
    requests: int,
    first: int,
    server_pid: int | None = None,
) -> dict:
    """``clients`` threads, each sending ``requests`` requests one after another.  The
    clients are made before the clock starts: making one costs the client process ~50 ms
    (its TLS context), four at once ~160 ms on two cores, while the server waits idle.
    The CPU the client process (and the server process ``server_pid``) used over the same
    span is reported beside the wall time: on a machine whose cores they share, what the
    clients use is not the server's."""
    made = [make_client(url, args) for _ in range(clients)]

    def worker(c: int) -> list[Timing]:
        with made[c] as client:
            return [one_request(client, first + c * requests + r, args) for r in range(requests)]

    with ThreadPoolExecutor(clients) as pool:
        cpu0 = (process_cpu(), process_cpu(server_pid) if server_pid else None)
        t0 = time.perf_counter()
        timings = [t for ts in pool.map(worker, range(clients)) for t in ts]
        wall = time.perf_counter() - t0
        cpu1 = (process_cpu(), process_cpu(server_pid) if server_pid else None)
    cpu = [None if None in (a, b) else b - a for a, b in zip(cpu0, cpu1, strict=True)]
    return summarize(timings, wall, *cpu)


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (0..100) of ``xs`` (nearest rank on the sorted values)."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def summarize(
    timings: list[Timing],
    wall: float,
    client_cpu: float | None = None,
    server_cpu: float | None = None,
) -> dict:
    tokens = sum(t.tokens for t in timings)
    ttft = [t.ttft for t in timings]
    itl = [b - a for t in timings for a, b in zip(t.arrivals, t.arrivals[1:], strict=False)]
    return {
        "requests": len(timings),
        "wall_s": wall,
        "completion_tokens": tokens,
        "aggregate_tok_s": tokens / wall if wall else 0.0,
        "ttft_s": {f"p{q}": pct(ttft, q) for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": 1000 * pct(itl, q) for q in (50, 90, 99)},
        "cached_prompt_tokens": sum(t.cached for t in timings),
        "client_cpu_s": client_cpu,
        "server_cpu_s": server_cpu,
    }


def show(title: str, r: dict) -> None:
    print(
        f"{title}: {r['requests']} requests, {r['completion_tokens']} tokens in "
        f"{r['wall_s']:.2f} s = {r['aggregate_tok_s']:.1f} tok/s aggregate; "
        f"TTFT p50/p90/p99 {r['ttft_s']['p50']:.3f}/{r['ttft_s']['p90']:.3f}/"
        f"{r['ttft_s']['p99']:.3f} s; inter-token p50/p90/p99 {r['itl_ms']['p50']:.1f}/"
        f"{r['itl_ms']['p90']:.1f}/{r['itl_ms']['p99']:.1f} ms{_cpu_text(r)}",
        flush=True,
    )


def _cpu_text(r: dict) -> str:
    """The line's CPU part, ``; CPU: clients 0.52 s (23% of the wall), server ...``, for
    the readings there are (empty without any)."""
    parts = [
        f"{who} {r[key]:.2f} s ({100 * r[key] / r['wall_s']:.0f}% of the wall)"
        for who, key in (("clients", "client_cpu_s"), ("server", "server_cpu_s"))
        if r.get(key) is not None and r["wall_s"] > 0
    ]
    return "; CPU: " + ", ".join(parts) if parts else ""


def server_argv(args: argparse.Namespace, port: int) -> list[str]:
    """The command that starts ``phimlx serve`` for ``--start``: the model, the port, a
    batch of room for every client, ``--backend`` and ``--api-key`` when given, then the
    options given after ``--`` (``args.serve_args``; a repeated option's last value wins)."""
    argv = [sys.executable, "-m", "phimlx", "serve", "--model", args.start, "--port", str(port),
            "--max-batch", str(max(args.clients, args.compare_n))]  # fmt: skip
    if args.backend:
        argv += ["--backend", args.backend]
    if args.api_key != "none":
        argv += ["--api-key", args.api_key]
    return argv + list(args.serve_args)


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """The server's URL and process id: ``--url`` (its process unknown: None), or a
    ``phimlx serve --model START`` started here."""
    if not args.start:
        yield args.url.rstrip("/"), None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(server_argv(args, port), env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"phimlx serve exited with {proc.returncode}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            if time.monotonic() - t0 > 600:
                raise SystemExit("phimlx serve did not come up in 600 s")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def compare(url: str, args: argparse.Namespace, first: int, server_pid: int | None = None) -> dict:
    """``--compare``: ``args.rounds`` rounds of K requests run one after another and K
    concurrently, which of the two comes first alternating from round to round (a machine
    that speeds up or slows down during the run favours neither).  Every request has a
    prompt of its own (`request_body`), so none is a whole-prompt cache hit of an earlier
    one.  Returns each round's results and speedup (sequential wall time / concurrent),
    and the speedups' median and spread."""
    k, rounds, n = args.compare_n, [], first
    for i in range(args.rounds):
        order = ("sequential", "concurrent") if i % 2 == 0 else ("concurrent", "sequential")
        r: dict = {}
        for mode in order:
            clients, each = (1, k) if mode == "sequential" else (k, 1)
            r[mode] = run(url, args, clients, each, n, server_pid)
            n += k
            what = "one after another" if mode == "sequential" else "concurrently"
            show(f"round {i + 1}: {k} requests {what}", r[mode])
        con = r["concurrent"]["wall_s"]
        r["speedup"] = r["sequential"]["wall_s"] / con if con else float("nan")
        print(f"round {i + 1}: {k} concurrent finish {r['speedup']:.2f}x faster than in "
              "sequence", flush=True)  # fmt: skip
        rounds.append(r)
    speedups = [r["speedup"] for r in rounds]
    out = {"rounds": rounds, "speedup_median": statistics.median(speedups),
           "speedup_min": min(speedups), "speedup_max": max(speedups)}  # fmt: skip
    print(f"{k} concurrent finish {out['speedup_median']:.2f}x faster than in sequence "
          f"(median of {len(speedups)} rounds; {out['speedup_min']:.2f}..."
          f"{out['speedup_max']:.2f}x)", flush=True)  # fmt: skip
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; what follows ``--`` is ``serve_args``, options for the server that
    ``--start`` starts (``-- --threads 1 --kv-cache-type q8_0``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    serve_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, serve_args = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] [-- phimlx serve's options, with --start]",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="a running server")
    p.add_argument("--start", metavar="MODEL", help="start `phimlx serve --model MODEL` here")
    p.add_argument("--backend", help="with --start: the server's --backend")
    p.add_argument("--api-key", default=os.environ.get("PHIMLX_API_KEY", "none"))
    p.add_argument("--model-name", default="phimlx", help="the request's model field")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--requests", type=int, default=2, help="requests per client, in turn")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per request (EOS ignored)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent first, not counted")
    p.add_argument(
        "--compare", action="store_true", help="also: K concurrent vs the same K in sequence"
    )
    p.add_argument("--compare-n", type=int, default=4, metavar="K", help="requests compared")
    p.add_argument(
        "--rounds", type=int, default=1, help="with --compare: alternating rounds (median, spread)"
    )
    p.add_argument(
        "--client",
        choices=["openai", "httpx"],
        default="openai",
        help="the `openai` package (default), or httpx with the events parsed by json.loads: "
        "less client work per token on the cores the server shares",
    )
    p.add_argument(
        "--no-stream",
        action="store_true",
        help="requests answered whole at the end (no server-sent events; TTFT is the request)",
    )
    p.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = p.parse_args(argv)
    if serve_args and not args.start:
        p.error(f"{' '.join(serve_args)}: options after -- go to the server --start starts")
    args.serve_args = serve_args
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    results: dict = {"args": vars(args)}
    with server(args) as (url, pid):
        health = httpx.get(f"{url}/health").json()
        print(f"server {url}: model {health.get('model')}", flush=True)
        n = 0
        if args.warmup:
            run(url, args, 1, args.warmup, n)
            n += args.warmup
        r = run(url, args, args.clients, args.requests, n, pid)
        n += args.clients * args.requests
        show(f"{args.clients} concurrent clients", r)
        results["load"] = r
        if args.compare:
            results["compare"] = compare(url, args, n, pid)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
