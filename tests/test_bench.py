"""The benchmark harness: runs end to end on a tiny model, reports every field, ignores EOS,
counts tokens, records the machine.  No timing thresholds: only structure and counts."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

from phimlx.bench import cli, machine, models, report, runners
from phimlx.gguf import open_gguf

PHI3_EOS = 32000  # <|endoftext|> in the Phi-3-like vocabulary of synthetic models


def _source_tree_version() -> str:
    """phimlx's version as pyproject.toml states it (read apart from the package)."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.M).group(1)  # type: ignore[union-attr]


# -- measure(): the core loop, on a fake engine --------------------------------------------


class FakeEngine:
    """An engine whose every logits vector says "stop now" (argmax = EOS)."""

    def __init__(self, vocab: int = 16, eos: int = 3) -> None:
        self.vocab, self.eos = vocab, eos
        self.pos = 0
        self.calls: list[tuple[str, int]] = []

    def _logits(self) -> np.ndarray:
        x = np.zeros(self.vocab, dtype=np.float32)
        x[self.eos] = 10.0
        return x

    def reset(self) -> None:
        self.pos = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.calls.append(("prefill", len(ids)))
        self.pos += len(ids)
        return self._logits()

    def decode(self, ids: list[int]) -> None:
        for _ in ids:
            self.calls.append(("step", 1))
            self.pos += 1

    @property
    def position(self) -> int:
        return self.pos


def test_measure_counts_tokens_and_ignores_eos() -> None:
    eng = FakeEngine()
    out = runners.measure(eng, list(range(10)), [eng.eos] * 7, warmup=True)
    assert out["pp_tokens"] == 10 and out["pp_position"] == 10
    assert out["tg_tokens"] == 7 and out["tg_position"] == 7  # EOS fed and predicted: no stop
    assert out["first_token"] == eng.eos
    # warm-up: a short prompt and two steps, then the measured prefill and 7 steps
    assert eng.calls[0] == ("prefill", 10)  # warm-up prompt: min(10, WARMUP_PROMPT)
    assert eng.calls.count(("step", 1)) == runners.WARMUP_STEPS + 7
    assert out["pp_s"] >= 0 and out["ttft_s"] >= out["pp_s"] and out["tg_s"] >= 0


def test_measure_without_warmup_runs_exactly_once() -> None:
    eng = FakeEngine()
    runners.measure(eng, [1, 2, 3], [4, 5], warmup=False)
    assert eng.calls == [("prefill", 3), ("step", 1), ("step", 1)]


# -- run_job(): real engines, in this process ------------------------------------------------


def _job(engine: str, path: Path, pp: list[int], tg: list[int]) -> dict[str, Any]:
    return {
        "engine": engine,
        "model": str(path),
        "threads": machine.physical_cores() or 1,  # numba's thread count is process-wide
        "pp_ids": pp,
        "tg_ids": tg,
        "max_context": 64,
        "warmup": True,
    }


RUN_FIELDS = (
    "engine",
    "threads",
    "version",
    "load_s",
    "pp_tokens",
    "pp_s",
    "ttft_s",
    "pp_position",
    "first_token",
    "tg_tokens",
    "tg_s",
    "tg_position",
    "peak_rss",
    "ok",
)


def test_numpy_runner_feeds_eos_and_counts(tiny_phi3: Path) -> None:
    pp = [1, 5, 9, 32000, 7, 32007, 2, 3]
    tg = [PHI3_EOS, 32007, PHI3_EOS, 11, PHI3_EOS]  # stop tokens everywhere: nothing stops
    r = runners.run_job(_job("numpy", tiny_phi3, pp, tg))
    for f in RUN_FIELDS:
        assert r.get(f) is not None, f
    assert r["ok"] is True
    assert (r["pp_tokens"], r["pp_position"]) == (8, 8)
    assert (r["tg_tokens"], r["tg_position"]) == (5, 5)
    assert 0 <= r["first_token"] < 32064


def test_llama_cpp_runner_counts_and_agrees_on_first_token(tiny_phi3: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        require("llama-cpp-python", "pip install llama-cpp-python")
    pp, tg = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [PHI3_EOS] * 4
    ours = runners.run_job(_job("numpy", tiny_phi3, pp, tg))
    theirs = runners.run_job(_job("llama.cpp", tiny_phi3, pp, tg))
    assert (theirs["pp_position"], theirs["tg_position"]) == (10, 4)
    assert theirs["tg_tokens"] == 4
    # Same file, same ids: the same next token (the engines compute the same model).
    assert theirs["first_token"] == ours["first_token"]


def test_bandwidth_job_reports_bytes_per_second() -> None:
    r = runners.run_job({"engine": "_bandwidth", "threads": 1, "mib": 16})
    assert r["ok"] and r["bytes_per_s"] > 0 and r["method"]


# -- the whole command, runners in subprocesses ---------------------------------------------


@pytest.fixture(scope="module")
def bench_result(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "result.json"
    code = cli.main(
        [
            str(tiny_phi3),
            "--backends",
            "numpy",
            "--pp",
            "6",
            "--tg",
            "5",
            "--repetitions",
            "2",
            "--threads",
            "1",
            "--bandwidth-mib",
            "16",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    return json.loads(out.read_text())


def test_main_reports_every_field(bench_result: dict[str, Any]) -> None:
    r = bench_result
    assert r["schema"] == cli.SCHEMA
    assert r["settings"] == {
        "pp": 6,
        "tg": 5,
        "repetitions": 2,
        "threads": 1,
        "n_batch": 512,
        "seed": 1234,
        "warmup": True,
        "depth": [0],
        "batch": [],
        "batch_prompt": runners.BATCH_PROMPT,
    }
    runs = r["engines"]["numpy"]["runs"]
    assert [x["repetition"] for x in runs] == [0, 1]
    for run in runs:
        for f in RUN_FIELDS:
            assert run.get(f) is not None, f
        assert (run["pp_tokens"], run["pp_position"], run["tg_tokens"], run["tg_position"]) == (
            6,
            6,
            5,
            5,
        )
    s = r["engines"]["numpy"]["summary"]
    for f in report.FIGURES:
        assert set(s[f]) == {"median", "min", "max", "n"} and s[f]["n"] == 2
        assert s[f]["min"] <= s[f]["median"] <= s[f]["max"]
    assert s["runs_ok"] == 2 and s["runs_failed"] == 0
    bw = s["bandwidth_bytes_per_s"]
    assert bw["median"] == pytest.approx(r["model"]["weight_bytes"] * s["tg_tps"]["median"])
    assert bw["fraction_of_machine"] > 0
    assert r["machine_bandwidth"]["1"]["bytes_per_s"] > 0


def test_main_uses_the_same_ids_everywhere(bench_result: dict[str, Any]) -> None:
    # first_token depends only on the model and the prompt ids: identical across repetitions
    firsts = {x["first_token"] for x in bench_result["engines"]["numpy"]["runs"]}
    assert len(firsts) == 1


def test_main_records_the_environment(bench_result: dict[str, Any]) -> None:
    m = bench_result["machine"]
    for key in (
        "cpu",
        "machine",
        "logical_cpus",
        "physical_cores",
        "ram_bytes",
        "os",
        "python",
        "versions",
    ):
        assert m.get(key) is not None, key
    assert m["versions"]["numpy"] == np.__version__
    assert m["versions"]["phimlx"] == bench_result["version"] == _source_tree_version()
    assert bench_result["commit"]  # a commit here (a checkout), a version where installed
    assert bench_result["command"].startswith("phimlx bench ")
    model = bench_result["model"]
    assert model["n_vocab"] == 32064 and model["weight_bytes"] <= model["file_bytes"]
    assert model["tensor_types"] == {"F32": sum(model["tensor_types"].values())}


def test_markdown_table_has_every_column(bench_result: dict[str, Any]) -> None:
    text = report.markdown(bench_result)
    header = next(ln for ln in text.splitlines() if ln.startswith("| engine"))
    for col in (
        "pp6 tok/s",
        "tg5 tok/s",
        "pp / llama.cpp",
        "tg / llama.cpp",
        "TTFT s",
        "load s",
        "peak RSS GiB",
        "bandwidth",
    ):
        assert col in header
    row = next(ln for ln in text.splitlines() if ln.startswith("| phimlx numpy"))
    assert row.count("|") == header.count("|")
    assert "Machine: " in text and "Command: `phimlx bench " in text


# -- summaries, ratios, table, without running anything ---------------------------------------


def _run(pp_s: float, tg_s: float, ok: bool = True) -> dict[str, Any]:
    return {
        "ok": ok,
        "pp_tokens": 100,
        "pp_s": pp_s,
        "ttft_s": pp_s + 0.01,
        "tg_tokens": 10,
        "tg_s": tg_s,
        "load_s": 1.0,
        "peak_rss": 2**30,
    }


def test_summary_is_median_min_max_of_tokens_per_second() -> None:
    s = report.summarize([_run(1.0, 1.0), _run(2.0, 0.5), _run(4.0, 2.0)], 10**9, 2e10)
    assert s["pp_tps"] == {"median": 50.0, "min": 25.0, "max": 100.0, "n": 3}
    assert s["tg_tps"] == {"median": 10.0, "min": 5.0, "max": 20.0, "n": 3}
    assert s["bandwidth_bytes_per_s"]["median"] == 1e10
    assert s["bandwidth_bytes_per_s"]["fraction_of_machine"] == 0.5


def test_failed_runs_are_counted_not_averaged() -> None:
    bad = {"ok": False, "error": "RuntimeError: boom"}
    s = report.summarize([_run(1.0, 1.0), bad], 1, None)
    assert s["runs_ok"] == 1 and s["runs_failed"] == 1 and s["errors"] == ["RuntimeError: boom"]
    assert s["bandwidth_bytes_per_s"]["fraction_of_machine"] is None


def test_ratios_are_ours_over_llama_cpp() -> None:
    sums = {
        "numpy": report.summarize([_run(2.0, 1.0)], 1, None),
        "llama.cpp": report.summarize([_run(1.0, 0.5)], 1, None),
    }
    r = report.ratios(sums)
    assert r["numpy"] == {"pp_tps": 0.5, "tg_tps": 0.5}
    assert r["llama.cpp"] == {"pp_tps": 1.0, "tg_tps": 1.0}
    assert report.ratios({"numpy": sums["numpy"]})["numpy"] == {"pp_tps": None, "tg_tps": None}


def test_token_ids_are_fixed_and_in_range() -> None:
    a = cli.token_ids(1000, 512, 128, seed=7)
    assert a == cli.token_ids(1000, 512, 128, seed=7)
    assert a != cli.token_ids(1000, 512, 128, seed=8)
    assert len(a[0]) == 512 and len(a[1]) == 128
    assert all(0 <= i < 1000 for i in a[0] + a[1])


# -- names and options --------------------------------------------------------------------


def test_engine_names_and_aliases() -> None:
    chosen, skipped = cli.select_engines("numpy, llama-cpp", 10)
    if "llama.cpp" not in chosen:  # only when llama-cpp-python is missing
        pytest.skip("llama-cpp-python not installed")
    assert chosen == ["numpy", "llama.cpp"] and skipped == {}
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        cli.select_engines("numpy,vllm", 10)
    auto, why = cli.select_engines("auto", 10)
    assert "numpy" in auto
    assert set(auto) | set(why) == set(runners.ENGINES)


def test_model_names() -> None:
    spec = models.synthetic_spec("synthetic:phi-3-mini-4k-instruct:q4_0")
    assert spec is not None and spec.mix == "Q4_0" and spec.n_layers == 32
    assert spec.context == 4096
    long = models.synthetic_spec("synthetic:phi-3-mini-128k-instruct")
    assert long is not None and long.mix == "Q4_K_M" and long.context == 131072
    assert models.synthetic_spec("smollm2-135m-instruct") is None
    assert models.synthetic_spec("phi-3-mini-4k-instruct") is None  # the real model
    with pytest.raises(models.ModelNameError, match="unknown quant mix"):
        models.synthetic_spec("synthetic:phi-3-mini-4k-instruct:Q9_X")
    with pytest.raises(models.ModelNameError, match="no synthetic model"):
        models.synthetic_spec("synthetic:smollm2-135m-instruct")
    with pytest.raises(models.ModelNameError, match="not a local file.*synthetic:PRESET"):
        models.resolve("/nonexistent/model.gguf")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("SmolLM2", "smollm2-135m-instruct"),
        ("phi3-mini", "synthetic:phi-3-mini-4k-instruct"),
        ("phi3-mini:Q4_0", "synthetic:phi-3-mini-4k-instruct:Q4_0"),
        ("phi3-mini-128k:q8_0", "synthetic:phi-3-mini-128k-instruct:q8_0"),
    ],
)
def test_old_names_are_translated_with_a_warning(
    old: str, new: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="phimlx.bench.models"):
        assert models.canonical_name(old) == new
    assert f"--model {old} is deprecated; it is now {new}" in caplog.text
    caplog.clear()
    assert models.canonical_name(new) == new and not caplog.text


def test_smollm2_name(smollm2_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = models.resolve("smollm2-135m-instruct")  # the preset, as `phimlx generate -m` names it
    assert m.path == smollm2_path.resolve() and not m.synthetic
    assert m.architecture == "llama" and m.n_vocab == 49152
    assert models.resolve("SmolLM2").path == m.path  # the old name still works
    assert "deprecated" in caplog.text
    with open_gguf(smollm2_path) as mf:  # tied embeddings: the whole table is read per token
        assert "output.weight" not in mf.tensors
        assert m.weight_bytes == sum(t.nbytes for t in mf.tensors.values())


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--model", "/nonexistent.gguf", "--no-progress"]) == 2
    assert "not a local file" in capsys.readouterr().err
    assert cli.main(["--pp", "-1"]) == 2
    assert "argument --pp: -1 is invalid" in capsys.readouterr().err
    assert cli.main(["--threads", "0"]) == 2
    assert "argument --threads: 0 is invalid" in capsys.readouterr().err


def test_plot_without_matplotlib_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "matplotlib" else real(name, *a),
    )
    assert cli.main(["--plot", "x.png", "--no-progress"]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_machine_description() -> None:
    info = machine.machine_info()
    line = machine.describe(info)
    assert info["python"] in line and "cores" in line


def test_busy_machine_is_flagged(bench_result: dict[str, Any]) -> None:
    quiet = {**bench_result, "machine": {**bench_result["machine"], "load_average": [0.1] * 3}}
    loud = {**bench_result, "machine": {**bench_result["machine"], "load_average": [5.0] * 3}}
    assert "machine was busy" not in report.markdown(quiet)
    assert "machine was busy" in report.markdown(loud)


def test_bench_takes_an_mlx_folder(tiny_phi3: Path, tmp_path: Path) -> None:
    """`phimlx bench` on an mlx-lm folder (written by `phimlx convert` from the tiny GGUF):
    the NumPy backend and mlx-lm run it, the GGUF readers are skipped with the reason, and
    the sizes come from the folder (parameters as in the GGUF)."""
    pytest.importorskip("mlx.core")
    from phimlx.mlx.convert import convert

    folder = tmp_path / "tiny-mlx"
    convert(tiny_phi3, folder, dtype="float32")
    out = tmp_path / "result.json"
    argv = [str(folder), "--backends", "numpy,llama.cpp", "--pp", "6", "--tg", "4"]
    argv += ["--repetitions", "1", "--threads", "1", "--bandwidth-mib", "16", "--no-progress"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert "llama.cpp" in r["skipped"] and "GGUF" in r["skipped"]["llama.cpp"]
    assert set(r["engines"]) == {"numpy"}
    assert all(run["ok"] for run in r["engines"]["numpy"]["runs"])
    with open_gguf(tiny_phi3) as mf:
        n_params = sum(t.n_elements for t in mf.tensors.values())
    folder_model = models.describe(folder, name="f", label="f")
    assert folder_model.n_params == n_params
    assert folder_model.architecture == "phi3"


def test_vs_puts_the_folder_beside_its_gguf(
    tiny_phi3: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--vs FOLDER``: the GGUF's engines and the folder's run in one alternation and one
    table, on the same token ids; the folder's rows name it, llama.cpp is skipped for it
    only, and its figures are the folder's own (its file size, its runs)."""
    pytest.importorskip("mlx.core")
    from phimlx.mlx.convert import convert

    folder = tmp_path / "tiny-mlx"
    convert(tiny_phi3, folder, dtype="float32")
    out = tmp_path / "result.json"
    argv = [str(tiny_phi3), "--vs", str(folder), "--backends", "numpy,llama.cpp"]
    argv += ["--pp", "6", "--tg", "4", "--repetitions", "2", "--threads", "1"]
    argv += ["--bandwidth-mib", "16", "--no-progress"]
    assert cli.main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    vs = "numpy [tiny-mlx]"
    assert list(r["engines"]) == ["numpy", "llama.cpp", vs]
    assert r["engines"][vs]["engine"] == "numpy" and r["engines"][vs]["model"] == "tiny-mlx"
    assert "llama.cpp [tiny-mlx]" in r["skipped"] and "llama.cpp" not in r["skipped"]
    assert r["vs_model"]["label"] == "tiny-mlx" and r["model"]["label"] == tiny_phi3.name
    for e in r["engines"].values():
        assert len(e["runs"]) == 2 and all(run["ok"] for run in e["runs"])
    gguf_run, folder_run = r["engines"]["numpy"]["runs"][0], r["engines"][vs]["runs"][0]
    assert gguf_run["tg_tokens"] == folder_run["tg_tokens"] == 4
    assert r["ratios_to_llama_cpp"][vs]["tg_tps"] is not None  # against the GGUF's llama.cpp
    table = capsys.readouterr().out  # (the table is printed with --json FILE too)
    assert "| phimlx numpy [tiny-mlx] |" in table and "| phimlx numpy |" in table
    assert "--vs" in table and "tiny-mlx" in table.splitlines()[1]
