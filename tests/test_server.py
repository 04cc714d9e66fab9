"""`phimlx serve`: the OpenAI API on 127.0.0.1, driven by the real `openai` client.

The server runs in this process (uvicorn in a thread, on a socket bound to a free port)
around the real SmolLM2 model, except one test that starts ``phimlx serve`` as a process
and stops it with SIGTERM.  Greedy answers are compared with what the library gives for
the same prompt alone (``temperature=0, repeat_penalty=1.0``, no prompt cache).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REQUIRE_ALL, require

try:
    import httpx
    import openai
    import uvicorn

    from phimlx.server import require_extra

    require_extra()
except ImportError as e:  # the server extra, and the clients of the test extra
    if REQUIRE_ALL:
        raise
    pytest.skip(f"the server's packages: {e} (pip install -e '.[test]')", allow_module_level=True)

import phimlx  # noqa: E402
from phimlx.prompt_cache import common_prefix  # noqa: E402
from phimlx.server import create_app  # noqa: E402
from phimlx.server.convert import library_options  # noqa: E402

CONTEXT = 1024
GREEDY = dict(temperature=0, repeat_penalty=1.0, max_context=CONTEXT, cache=False)
PROMPTS = ["What is the capital of France?", "Count from one to ten.", "Say hi."]
DEADLINE = 120.0  # seconds to wait for something that must happen (not a speed check)


@pytest.fixture(scope="module")
def model(smollm2_path):
    with phimlx.load(smollm2_path, backend="numpy") as m:
        yield m


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            assert thread.is_alive(), "the server thread died"
            assert time.monotonic() - t0 < DEADLINE, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(DEADLINE)
        sock.close()


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=DEADLINE)


@pytest.fixture(scope="module")
def url(model) -> Iterator[str]:
    app = create_app(
        model, model_id="smol", max_batch=8, max_queue=8, max_context=CONTEXT,
        max_body_bytes=100_000,
    )  # fmt: skip
    with running(app) as base:
        yield base


@pytest.fixture(scope="module")
def api(url) -> openai.OpenAI:
    return client(url)


def alone(model, prompt, **kw) -> phimlx.Result:
    """What the library gives for ``prompt`` alone, greedy (a message list: chat)."""
    return model.generate(prompt, **{**GREEDY, **kw})


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def wait_idle(url: str) -> dict:
    """/health once nothing runs or waits (the engine freed every slot)."""
    t0 = time.monotonic()
    while True:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["waiting"] == 0:
            return health
        assert time.monotonic() - t0 < DEADLINE, f"the engine stays busy: {health}"
        time.sleep(0.05)


# -- endpoints -------------------------------------------------------------------------------


def test_models_and_health(url, api):
    assert [m.id for m in api.models.list().data] == ["smol"]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["model"] == "smol"


def test_chat_greedy_is_the_library_greedy_text(model, api):
    want = alone(model, user(PROMPTS[0]), max_tokens=16)
    model.clear_cache()  # a cached prefix gives the prompt's logits to rounding only
    r = api.chat.completions.create(
        model="smol", messages=user(PROMPTS[0]), max_tokens=16, temperature=0
    )
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == want.text
    assert choice.finish_reason == {"context": "length"}.get(want.finish_reason, want.finish_reason)
    assert r.usage.prompt_tokens == len(model.encode_prompt(user(PROMPTS[0])))
    assert r.usage.completion_tokens == len(want.tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.object == "chat.completion" and r.model == "smol"

    # streamed, with usage: the same answer (the same call again: the prompt is all cached)
    stream = api.chat.completions.create(
        model="smol", messages=user(PROMPTS[0]), max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == choice.finish_reason and not any(finishes[:-1])
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    use = chunks[-1].usage
    assert use.completion_tokens == r.usage.completion_tokens
    assert use.prompt_tokens == use.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens


def test_stream_ends_with_done(url):
    body = {"messages": user("Say hi."), "max_tokens": 3, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=DEADLINE) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "length"


def test_completions_raw_prompt(model, api):
    prompt = "The capital of France is"
    want = alone(model, prompt, chat=False, max_tokens=10)
    r = api.completions.create(model="smol", prompt=prompt, max_tokens=10, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    streamed = api.completions.create(
        model="smol", prompt=prompt, max_tokens=10, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == want.text
    ids = model.tokenizer.encode(prompt)
    by_ids = api.completions.create(model="smol", prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == want.text


def test_stop_strings(model, api):
    prompt = "One, two, three, four,"
    plain = alone(model, prompt, chat=False, max_tokens=16).text
    stop = plain[len(plain) // 2 :][:3]
    assert stop.strip(), plain
    want = alone(model, prompt, chat=False, max_tokens=16, stop=[stop])
    assert want.finish_reason == "stop"
    kw = dict(model="smol", prompt=prompt, max_tokens=16, temperature=0)
    r = api.completions.create(**kw, stop=stop)
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "stop"
    chunks = list(api.completions.create(**kw, stop=[stop, "never"], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_conversation_reuses_the_prompt_cache(model, api):
    messages = user("Tell me a fact about owls.")
    first = api.chat.completions.create(
        model="smol", messages=messages, max_tokens=10, temperature=0
    )
    again = api.chat.completions.create(
        model="smol", messages=messages, max_tokens=10, temperature=0
    )
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens
    turn2 = [
        *messages,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And one about cats?"},
    ]
    r = api.chat.completions.create(model="smol", messages=turn2, max_tokens=8, temperature=0)
    cached = r.usage.prompt_tokens_details.cached_tokens
    # the first turn's prompt and reply come from the cache; only the new turn is prefilled
    assert first.usage.prompt_tokens < cached < r.usage.prompt_tokens
    s = api.chat.completions.create(
        model="smol", messages=turn2, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    assert list(s)[-1].usage.prompt_tokens_details.cached_tokens == r.usage.prompt_tokens


def test_seeded_sampling_repeats(api):
    kw = dict(model="smol", prompt="Once upon a time", max_tokens=12, temperature=0.9, seed=7)
    assert (
        api.completions.create(**kw).choices[0].text == api.completions.create(**kw).choices[0].text
    )


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=5), "temperature"),
        (dict(n=2), "n"),
        (dict(top_p=0), "top_p"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (
            dict(messages=[{"role": "tool", "content": "3", "tool_call_id": "x"}]),
            "messages[0].role",
        ),
        (dict(messages=[{"role": "user", "content": None}]), "messages[0].content"),
        (
            dict(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
            "messages[0].content",
        ),
        (dict(messages=[]), "messages"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
        (dict(logit_bias={"x": 1}), "logit_bias"),
        (dict(top_logprobs=2), "top_logprobs"),
        (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    ],
)
def test_invalid_requests_are_400_naming_the_field(api, change, param):
    kw = dict(model="smol", messages=user("hi"), max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(**{**kw, **change})
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in e.value.body["message"]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        (dict(n=3), "n"),
        (dict(echo=True), "echo"),
        (dict(suffix="x"), "suffix"),
        (dict(best_of=2), "best_of"),
        (dict(prompt=["one", "two"]), "prompt"),
        (dict(prompt=""), "prompt"),
        (dict(logprobs=21), "logprobs"),
    ],
)
def test_invalid_completions_are_400_naming_the_field(api, change, param):
    kw = dict(model="smol", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(**{**kw, **change})
    assert e.value.body["param"] == param


def test_without_the_prompt_cache(model):
    """``--no-cache``: each request prefills its whole prompt (in its stream), same text."""
    want = alone(model, RAW[1], chat=False, max_tokens=6)
    with running(create_app(model, model_id="smol", cache=False, max_context=CONTEXT)) as url:
        api = client(url)
        for _ in range(2):
            r = api.completions.create(model="smol", prompt=RAW[1], max_tokens=6, temperature=0)
            assert r.choices[0].text == want.text
            assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_longer_than_the_context_is_400(api):
    with pytest.raises(openai.BadRequestError) as e:
        api.chat.completions.create(
            model="smol", messages=user("hello " * (CONTEXT + 50)), max_tokens=2
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="smol", prompt="hello " * (CONTEXT + 50), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        api.completions.create(model="smol", prompt=[1, 2, 10**9], max_tokens=2)
    assert e.value.body["param"] == "prompt"


def test_malformed_body_unknown_route_and_size_limit(url, api):
    r = httpx.post(
        f"{url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="smol", input="hi")
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 200_000, "max_tokens": 1})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_key(model):
    with running(create_app(model, model_id="smol", api_key="sekret")) as url:
        for key in ("none", "sekret2"):
            with pytest.raises(openai.AuthenticationError) as e:
                client(url, key).models.list()
            assert e.value.body["code"] == "invalid_api_key"
        assert client(url, "sekret").models.list().data[0].id == "smol"
        # without the key, an invalid body is a 401 too (nothing is validated for strangers)
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": []})
        assert r.status_code == 401
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"messages": []},
            headers={"Authorization": "Bearer sekret"},
        )
        assert r.status_code == 400
        assert httpx.get(f"{url}/health").status_code == 200  # liveness stays open


# -- sampling options from the library -------------------------------------------------------


def test_logprobs(model, api):
    if "logprobs" not in library_options(model):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(
                model="smol", messages=user("hi"), max_tokens=2, logprobs=True
            )
        assert "not supported yet" in e.value.body["message"]
        pytest.skip("the library has no logprobs yet")
    # A prompt no other request starts with: a prompt that is a prefix of one served
    # before (test_stop_strings' "One, two, three, four,") has its last token recomputed
    # on the prompt cache's session, and on the int8 path that rounds differently from a
    # whole prefill (a greedy pick can change; the library's own cache does the same).
    prompt = "Ten, nine,"
    want = alone(model, prompt, chat=False, max_tokens=5, logprobs=3)
    c = api.completions.create(model="smol", prompt=prompt, max_tokens=5, temperature=0, logprobs=3)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == want.text
    assert lp.tokens == [x.chosen.text for x in want.logprobs]
    assert lp.token_logprobs == pytest.approx([x.chosen.logprob for x in want.logprobs])
    assert lp.top_logprobs == [
        pytest.approx({t.text: t.logprob for t in x.top}) for x in want.logprobs
    ]
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    streamed = list(
        api.completions.create(
            model="smol", prompt=prompt, max_tokens=5, temperature=0, logprobs=3, stream=True
        )
    )
    offsets = [
        o for ch in streamed if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset
    ]
    assert offsets == lp.text_offset

    r = api.chat.completions.create(
        model="smol", messages=user(PROMPTS[2]), max_tokens=6, temperature=0, logprobs=True,
        top_logprobs=3,
    )  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(x.token for x in content) == r.choices[0].message.content
    for x in content:
        assert x.bytes == list(x.token.encode())
        assert len(x.top_logprobs) == 3
        assert x.logprob == pytest.approx(max(t.logprob for t in x.top_logprobs))  # greedy
    r = api.chat.completions.create(
        model="smol", messages=user(PROMPTS[2]), max_tokens=2, temperature=0, logprobs=True
    )
    assert all(x.top_logprobs == [] for x in r.choices[0].logprobs.content)


def test_json_schema_response_format(model, api):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    kw = dict(model="smol", messages=user("Describe a person as JSON."), temperature=0)
    if "json_schema" not in library_options(model):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(**kw, max_tokens=2, response_format=fmt)
        assert e.value.body["param"] == "response_format"
        pytest.skip("the library has no json_schema yet")
    import jsonschema

    r = api.chat.completions.create(**kw, max_tokens=60, response_format=fmt)
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = api.chat.completions.create(**kw, max_tokens=60, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}
        api.chat.completions.create(**kw, max_tokens=2, response_format=bad)
    assert e.value.body["param"] == "response_format"


def test_penalties_and_logit_bias(model, api):
    if "presence_penalty" not in library_options(model):
        with pytest.raises(openai.BadRequestError) as e:
            api.chat.completions.create(
                model="smol", messages=user("hi"), max_tokens=2, presence_penalty=1.0
            )
        assert e.value.body["param"] == "presence_penalty"
        pytest.skip("the library has no presence_penalty yet")
    prompt = "One, two, three, four,"
    kw = dict(presence_penalty=0.5, frequency_penalty=0.5)
    want = alone(model, prompt, chat=False, max_tokens=12, **kw)
    r = api.completions.create(model="smol", prompt=prompt, max_tokens=12, temperature=0, **kw)
    assert r.choices[0].text == want.text
    first = want.tokens[0]
    r = api.completions.create(
        model="smol", prompt=prompt, max_tokens=2, temperature=0, logit_bias={str(first): -100}
    )
    banned = alone(model, prompt, chat=False, max_tokens=2, logit_bias={first: -100})
    assert r.choices[0].text == banned.text
    assert banned.tokens[0] != first


# -- continuous batching ---------------------------------------------------------------------

RAW = [  # short raw prompts: each prefills in one small piece
    "The capital of France is",
    "One, two, three,",
    "Once upon a time",
    "The best way to learn",
    "def fibonacci(n):",
    "My favourite colour is",
    "Water boils at",
    "The sun rises in the",
]


def bench_serve() -> types.ModuleType:
    """The ``bench/serve.py`` script as a module."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "bench"))
    try:
        import serve
    finally:
        sys.path.pop(0)
    return serve


@pytest.mark.parametrize("no_stream", [False, True])
@pytest.mark.parametrize("kind", ["openai", "httpx"])
def test_bench_serve_script_counts_every_token(url, kind, no_stream):
    """`bench/serve.py` against this server with either client, streamed or not: every
    request is timed over exactly its ``--max-tokens`` tokens, and the totals add up."""
    bench = bench_serve()
    args = argparse.Namespace(
        model_name="smol", api_key="none", max_tokens=5, client=kind, no_stream=no_stream
    )
    r = bench.run(url, args, clients=2, requests=2, first=0)
    assert r["requests"] == 4 and r["completion_tokens"] == 4 * 5
    # the client process's CPU over the run; the server's only where its process is known
    assert r["client_cpu_s"] > 0 and r["server_cpu_s"] is None
    with httpx.Client(base_url=url) if kind == "httpx" else client(url) as c:
        one = bench.one_request(c, 3, args)
    assert one.tokens == 5
    if no_stream:  # one response: no chunks, the first token is timed with the end
        assert one.arrivals == [] and one.first is None and one.ttft == one.end - one.start
    else:
        assert 1 <= len(one.arrivals) <= 5
        assert one.start <= one.first <= one.arrivals[-1] <= one.end
    assert one.cached > 0  # the same prompt as the run's fourth request, kept


def test_bench_serve_reads_cpu_time():
    """`bench/serve.py`'s CPU readings: this process's (os.times) counts a spin of 0.3 s of
    CPU, psutil's reading of this process by its id agrees, a process gone reads None."""
    bench = bench_serve()
    before, t0 = bench.process_cpu(), time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    assert bench.process_cpu() - before >= 0.28  # (os.times counts in clock ticks)
    pytest.importorskip("psutil")
    assert bench.process_cpu(os.getpid()) == pytest.approx(bench.process_cpu(), abs=0.05)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert bench.process_cpu(int(gone.stdout)) is None


def test_bench_serve_passes_what_follows_dashes_to_the_server():
    """`bench/serve.py --start M ... -- OPTIONS`: the server it starts gets OPTIONS after
    its own; without --start there is no server to give them to, a usage error."""
    bench = bench_serve()
    args = bench.parse_args(["--start", "m.gguf", "--clients", "3", "--api-key", "k", "--",
                             "--threads", "1", "--max-batch", "2"])  # fmt: skip
    assert args.serve_args == ["--threads", "1", "--max-batch", "2"]
    assert bench.server_argv(args, 8123)[1:] == [
        "-m", "phimlx", "serve", "--model", "m.gguf", "--port", "8123", "--max-batch", "4",
        "--api-key", "k", "--threads", "1", "--max-batch", "2",
    ]  # fmt: skip
    assert bench.parse_args(["--start", "m.gguf"]).serve_args == []
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--compare", "--", "--threads", "1"])
    assert e.value.code == 2


def test_bench_serve_times_requests_not_client_making(monkeypatch):
    """`bench/serve.py`'s wall time runs from the first request sent to the last answered:
    making a client (~50 ms each, its TLS context) comes before the clock, or the K
    concurrent clients' making would count K times against the server (a fake clock:
    making a client takes 10 s of it, a request 1 s)."""
    bench = bench_serve()
    clock = [0.0]
    lock = threading.Lock()

    def tick(s: float) -> None:
        with lock:
            clock[0] += s

    def make(url: str, args: argparse.Namespace) -> contextlib.nullcontext:
        tick(10.0)
        return contextlib.nullcontext()

    def request(c: object, i: int, args: argparse.Namespace) -> object:
        t = bench.Timing(clock[0])
        tick(1.0)
        t.end, t.tokens = clock[0], 1
        return t

    monkeypatch.setattr(bench, "make_client", make)
    monkeypatch.setattr(bench, "one_request", request)
    # the script's own name for the module only: the server's threads keep the real clock
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    r = bench.run("http://unused", argparse.Namespace(), clients=4, requests=2, first=0)
    assert r["requests"] == 8 and r["wall_s"] == 8.0  # the 8 requests' seconds, no making


def test_bench_serve_compare_rounds(url, capsys):
    """`bench/serve.py --compare --rounds 2`: each round times K requests in turn and K at
    once, every one of them over its tokens, and the median and spread are those of the
    rounds' own wall times."""
    bench = bench_serve()
    args = argparse.Namespace(
        model_name="smol", api_key="none", max_tokens=3, client="httpx", compare_n=2,
        rounds=2, no_stream=False,
    )  # fmt: skip
    r = bench.compare(url, args, first=100)
    assert len(r["rounds"]) == 2
    speedups = []
    for rnd in r["rounds"]:
        for mode in ("sequential", "concurrent"):
            assert rnd[mode]["requests"] == 2 and rnd[mode]["completion_tokens"] == 2 * 3
        speedups.append(rnd["sequential"]["wall_s"] / rnd["concurrent"]["wall_s"])
    assert [x["speedup"] for x in r["rounds"]] == speedups
    assert r["speedup_median"] == (speedups[0] + speedups[1]) / 2
    assert (r["speedup_min"], r["speedup_max"]) == (min(speedups), max(speedups))
    out = capsys.readouterr().out
    # the second round runs the concurrent requests first
    second = out[out.index("round 2:") :]
    assert second.index("concurrently") < second.index("one after another")
    wait_idle(url)


def stream_text(api: openai.OpenAI, prompt: str, max_tokens: int) -> tuple[str, str]:
    """A greedy streamed text completion: its text and finish reason."""
    s = api.completions.create(
        model="smol", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True
    )
    chunks = [c for c in s if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("n", [4, 8])
def test_simultaneous_greedy_streams_each_give_their_text_alone(model, url, api, n):
    prompts = RAW[:n]
    want = [alone(model, p, chat=False, max_tokens=16) for p in prompts]
    model.clear_cache()  # every request prefills its prompt in the server
    spy = _BatchSizes(model)
    with spy, ThreadPoolExecutor(n) as pool:
        got = list(pool.map(lambda p: stream_text(api, p, 16), prompts))
    for (text, finish), w in zip(got, want, strict=True):
        assert text == w.text
        assert finish == {"context": "length"}.get(w.finish_reason, w.finish_reason)
    assert max(spy.sizes) > 1, "the streams were never stepped together"
    wait_idle(url)


def test_simultaneous_requests_each_reuse_a_kept_shared_prefix(model, url, api):
    """Requests that arrive together and share the start of one kept session (a system
    prompt) each get that prefix from the cache (`PromptCache.take` forks it), and answer
    as the same requests sent one after another do."""
    system = {"role": "system", "content": "You are a helpful assistant. Answer briefly."}
    opening = [system, *user("Describe a quiet morning by a lake.")]
    prompts = [[system, *user(q)] for q in ("Name a colour.", "Name a fruit.",
                                            "Name a city.", "Name an animal.")]  # fmt: skip
    ids = model.encode_prompt(opening)
    shared = [common_prefix(ids, model.encode_prompt(p)) for p in prompts]

    def ask(messages: list) -> openai.types.chat.ChatCompletion:
        return api.chat.completions.create(
            model="smol", messages=messages, max_tokens=6, temperature=0
        )

    def after_opening(together: bool) -> list:
        model.clear_cache()
        first = api.chat.completions.create(
            model="smol", messages=opening, max_tokens=40, temperature=0,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        assert first.usage.completion_tokens == 40
        if not together:
            return [ask(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            return list(pool.map(ask, prompts))

    one_by_one, together = after_opening(False), after_opening(True)
    for r, alone_r, n in zip(together, one_by_one, shared, strict=True):
        assert r.usage.prompt_tokens_details.cached_tokens >= n > 0
        assert r.choices[0].message.content == alone_r.choices[0].message.content
    wait_idle(url)


def test_simultaneous_greedy_streams_on_mlx(smollm2_path):
    """The engine is backend-neutral: on MLX (``mlx[cpu]`` on Linux), streams together
    each give their text alone too."""
    try:
        import mlx.core  # noqa: F401
    except ImportError:
        require("mlx", 'pip install "mlx[cpu]" mlx-lm')
    prompts = RAW[:2]
    with phimlx.load(smollm2_path, backend="mlx") as model:
        want = [alone(model, p, chat=False, max_tokens=8) for p in prompts]
        spy = _BatchSizes(model)
        app = create_app(model, model_id="smol", max_context=CONTEXT)
        with running(app) as url, spy, ThreadPoolExecutor(len(prompts)) as pool:
            api = client(url)
            got = list(pool.map(lambda p: stream_text(api, p, 8)[0], prompts))
        assert got == [w.text for w in want]
        assert max(spy.sizes) > 1


class _BatchSizes:
    """Records the batch size of every batched forward pass of ``model``."""

    def __init__(self, model) -> None:
        self.backend = model._backend_model
        self.sizes: list[int] = []

    def __enter__(self) -> _BatchSizes:
        inner = self.backend.step_batch

        def spy(sessions, ids):
            self.sizes.append(len(sessions))
            return inner(sessions, ids)

        self.backend.step_batch = spy
        return self

    def __exit__(self, *exc) -> None:
        del self.backend.step_batch


@pytest.fixture(scope="module")
def float_model(smollm2_path):
    """SmolLM2 with float activations and a float32 KV cache: a prompt prefilled in pieces
    gives a whole prefill's logits to float rounding (with int8 activations, pieces and a
    whole prompt take different kernels: their logits differ at the quantization level)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PHIMLX_INT8_ACTIVATIONS", "0")
        m = phimlx.load(smollm2_path, backend="numpy", kv_cache_type="f32")
    with m:
        yield m


def test_prefill_in_pieces_between_decode_steps(float_model):
    """A longer prompt joins in pieces of 8 tokens while another stream decodes; both give
    their text alone."""
    model = float_model
    long_prompt = (
        "Here is a list of fruits: apple, banana, cherry, grape, lemon, mango, orange, peach, "
        "pear and"
    )
    assert len(model.tokenizer.encode(long_prompt)) > 3 * 8
    # the first runs 64 tokens (EOS ignored): the second is sent once the first has streamed
    # its first token, so it joins a running batch however fast the steps are
    want = [
        alone(model, RAW[0], chat=False, max_tokens=64, ignore_eos=True),
        alone(model, long_prompt, chat=False, max_tokens=12),
    ]
    app = create_app(model, model_id="smol", max_context=CONTEXT, prefill_chunk=8)
    spy = _BatchSizes(model)
    with running(app) as url, spy, ThreadPoolExecutor(1) as pool:
        api = client(url)
        stream = api.completions.create(
            model="smol", prompt=RAW[0], max_tokens=64, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        texts, second = [], None
        for c in stream:
            if c.choices:
                texts.append(c.choices[0].text)
                if second is None:
                    second = pool.submit(stream_text, api, long_prompt, 12)
        assert second is not None
        got = ["".join(texts), second.result()[0]]
    assert got == [w.text for w in want]
    assert max(spy.sizes) == 2


def test_queue_limit_429_and_dropped_client_frees_its_slot(model):
    app = create_app(model, model_id="smol", max_batch=1, max_queue=1, max_context=CONTEXT)
    with running(app) as url:
        api = client(url)
        endless = dict(model="smol", messages=user("Tell a long story."), temperature=0,
                       max_tokens=CONTEXT, extra_body={"ignore_eos": True})  # fmt: skip
        running_stream = api.chat.completions.create(**endless, stream=True)
        next(iter(running_stream))  # it holds the one batch slot
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(stream_text, api, RAW[2], 4)  # waits in the queue
            t0 = time.monotonic()
            while httpx.get(f"{url}/health").json()["waiting"] < 1:
                assert time.monotonic() - t0 < DEADLINE
                time.sleep(0.02)
            with pytest.raises(openai.RateLimitError) as e:
                api.chat.completions.create(model="smol", messages=user("hi"), max_tokens=2)
            assert e.value.response.headers["retry-after"] == "1"
            assert e.value.body["type"] == "rate_limit_error"
            running_stream.close()  # the client goes away: its slot goes to the queued one
            text, finish = queued.result(timeout=DEADLINE)
        assert finish in ("length", "stop") and text
        wait_idle(url)
        # and non-streaming: a client that disconnects is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            body = {"messages": user("Tell a long story."), "max_tokens": CONTEXT,
                    "ignore_eos": True}  # fmt: skip
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=1.0)
        health = wait_idle(url)
        assert health["running"] == 0
    model.clear_cache()


def test_engine_stop_ends_requests_in_flight_and_queued(model):
    """What shutdown does once the grace period is over: the running request and the queued
    one end with `EngineStoppedError`; nothing is accepted afterwards."""
    import asyncio

    from phimlx.server.convert import prepare, stream_kwargs
    from phimlx.server.engine import Engine, EngineStoppedError, QueueFullError
    from phimlx.server.schemas import CompletionRequest

    def call(prompt: str):
        body = CompletionRequest(prompt=prompt, max_tokens=CONTEXT, ignore_eos=True)
        kw = stream_kwargs(body, supported=library_options(model), context=CONTEXT, cache=True)
        return prepare(model, prompt, {**kw, "max_context": CONTEXT})

    engine = Engine(model, max_batch=1, max_queue=1)
    engine.start()

    async def main() -> None:
        running_one, queued = engine.submit(call(RAW[0])), engine.submit(call(RAW[1]))
        with pytest.raises(QueueFullError):
            engine.submit(call(RAW[2]))
        assert (await running_one.get()).finish_reason is None
        await asyncio.to_thread(engine.stop)
        with pytest.raises(EngineStoppedError):
            while (await running_one.get()).finish_reason is None:
                pass
        with pytest.raises(EngineStoppedError):
            await queued.get()
        with pytest.raises(EngineStoppedError):
            engine.submit(call(RAW[0]))

    asyncio.run(main())
    assert not engine.alive
    model.clear_cache()


# -- the command -----------------------------------------------------------------------------


@pytest.mark.parametrize("warmup", [True, False])
def test_app_warms_up_before_it_takes_requests(model, monkeypatch, warmup):
    """``create_app(warmup=True)`` (what `serve` and ``phimlx serve`` ask for unless
    ``--no-warmup``) runs `Model.warm_up` once, at startup, before the engine takes
    requests; without it, not at all."""
    seen = []
    real = model.warm_up

    def spy() -> float:
        seen.append(app.state.engine.alive)  # the engine thread: not started yet
        return real()

    monkeypatch.setattr(model, "warm_up", spy)
    app = create_app(model, model_id="smol", max_context=CONTEXT, warmup=warmup)
    with running(app) as base:
        assert seen == ([False] if warmup else [])
        r = client(base).completions.create(model="smol", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens <= 2
    assert len(seen) == int(warmup)


def test_app_serves_when_its_warm_up_fails(model, monkeypatch, caplog):
    def broken() -> float:
        raise RuntimeError("no warm-up today")

    monkeypatch.setattr(model, "warm_up", broken)
    app = create_app(model, model_id="smol", max_context=CONTEXT, warmup=True)
    with caplog.at_level("WARNING", logger="phimlx.server.app"), running(app) as base:
        r = client(base).completions.create(model="smol", prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens <= 2
    assert "the warm-up failed" in caplog.text and "no warm-up today" in caplog.text


def test_phimlx_serve_command_and_sigterm(smollm2_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "phimlx", "serve", "--model", str(smollm2_path),
            "--port", str(port), "--max-context", "512", "--api-key", "k", "-v",
            "--shutdown-timeout", "60"]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ})
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            assert time.monotonic() - t0 < DEADLINE, "the server did not come up"
            time.sleep(0.2)
        api = client(f"http://127.0.0.1:{port}", "k")
        name = smollm2_path.stem
        assert [m.id for m in api.models.list().data] == [name]
        r = api.chat.completions.create(model=name, messages=user("hi"), max_tokens=3)
        assert r.usage.completion_tokens <= 3
        # a stream in flight when SIGTERM comes finishes (within --shutdown-timeout)
        stream = api.completions.create(
            model=name, prompt="Once upon a time", max_tokens=20, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        first = next(chunks)
        proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert (rest or [first])[-1].choices[0].finish_reason == "length"
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert proc.wait(timeout=DEADLINE) in (0, -signal.SIGTERM)
        err = proc.stderr.read()
        assert "Traceback" not in err, err
        assert "warmed up in" in err and "engine stopped" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- the OpenAPI spec, fuzzed --------------------------------------------------------------


CONSTRAINED = ("response_format", "json_schema", "regex", "grammar")


def fuzz(tiny_phi3, prepare, examples: int) -> None:
    """Requests generated from the server's own OpenAPI spec (valid and not, ``examples``
    per operation, ``prepare`` applied to each) must never get a 5xx; on a tiny
    random-weight model, for fast answers."""
    try:
        import schemathesis
    except ImportError:
        require("schemathesis", "pip install -e '.[test]'")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error, status_code_conformance

    with (
        phimlx.load(tiny_phi3, backend="numpy") as m,
        running(create_app(m, model_id="tiny", max_context=64)) as base,
    ):
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        operations = [op.ok() for op in schema.get_all_operations()]
        assert {o.path for o in operations} >= {"/v1/chat/completions", "/v1/completions"}
        for operation in operations:

            @settings(
                max_examples=examples,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            @given(case=operation.as_strategy().map(prepare))
            def check(case) -> None:
                case.call_and_validate(
                    checks=[not_a_server_error, status_code_conformance], timeout=DEADLINE
                )

            check()


def unconstrained(case):
    if isinstance(case.body, dict):
        for name in CONSTRAINED:
            case.body.pop(name, None)
    return case


def test_schemathesis_no_server_errors(tiny_phi3):
    """The spec fuzzed, without constrained decoding (the next test has it)."""
    fuzz(tiny_phi3, unconstrained, 25)


def test_schemathesis_no_server_errors_constrained(tiny_phi3):
    """The spec fuzzed with ``response_format``, ``json_schema``, ``regex``, ``grammar``."""
    fuzz(tiny_phi3, lambda case: case, 12)


def test_non_ascii_regex_on_a_sentencepiece_vocabulary(tiny_phi3):
    """Found by the fuzz test above with more examples (SmolLM2's BPE vocabulary was fine):
    llguidance tokenized forced bytes with the "▁" SentencePiece puts before a text run."""
    with (
        phimlx.load(tiny_phi3, backend="numpy") as m,
        running(create_app(m, model_id="tiny", max_context=64)) as base,
    ):
        if "regex" not in library_options(m):
            pytest.skip("the library has no regex constraint yet")
        body = {"prompt": "hello", "max_tokens": 4, "temperature": 0, "regex": "½%"}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=DEADLINE)
        assert r.status_code == 200, r.text[:300]
        assert r.json()["choices"][0]["text"] == "½%"


@pytest.mark.parametrize(("flag", "want"), [([], True), (["--no-warmup"], False)])
def test_serve_command_warms_up_unless_told_not_to(tiny_phi3, monkeypatch, flag, want):
    import phimlx.server
    from phimlx import cli

    got: dict = {}
    monkeypatch.setattr(phimlx.server, "serve", lambda model, **kw: got.update(kw))
    assert cli.main(["serve", "--model", str(tiny_phi3), *flag]) == 0
    assert got["warmup"] is want
