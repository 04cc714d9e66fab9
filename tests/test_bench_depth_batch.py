"""`phimlx bench --depth` (llama-bench's -d) and `--batch` (B sequences decoded together):
the measuring loops on fake engines, the runners on a tiny model, the whole command's JSON,
table and errors.  Structure and counts only, never timing thresholds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import require

from phimlx.bench import cli, report, runners

# -- measure() at depths, on a fake engine ---------------------------------------------------


class FakeEngine:
    """Records what it is asked to do; logits point at the position (so depth shows)."""

    def __init__(self, vocab: int = 64) -> None:
        self.vocab, self.pos = vocab, 0
        self.calls: list[tuple[str, int]] = []

    def reset(self) -> None:
        self.calls.append(("reset", 0))
        self.pos = 0

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.calls.append(("prefill", len(ids)))
        self.pos += len(ids)
        x = np.zeros(self.vocab, np.float32)
        x[self.pos % self.vocab] = 1.0
        return x

    def decode(self, ids: list[int]) -> None:
        self.calls.append(("decode", len(ids)))
        self.pos += len(ids)

    @property
    def position(self) -> int:
        return self.pos


def test_measure_fills_each_depth_untimed_before_pp_and_tg() -> None:
    eng = FakeEngine()
    out = runners.measure(
        eng, [1] * 5, [2] * 3, warmup=False, depths=[0, 10, 20], depth_ids=list(range(20))
    )
    assert eng.calls == [
        ("reset", 0), ("prefill", 5), ("reset", 0), ("decode", 3),  # depth 0: no fill
        ("reset", 0), ("prefill", 10), ("prefill", 5), ("reset", 0), ("prefill", 10), ("decode", 3),
        ("reset", 0), ("prefill", 20), ("prefill", 5), ("reset", 0), ("prefill", 20), ("decode", 3),
    ]  # fmt: skip
    assert [r["depth"] for r in out["depths"]] == [0, 10, 20]
    assert [r["pp_position"] for r in out["depths"]] == [5, 15, 25]
    assert [r["tg_position"] for r in out["depths"]] == [3, 13, 23]
    assert [r["first_token"] for r in out["depths"]] == [5, 15, 25]
    # the top level is the first depth's, as the output had it before depths
    assert out["depth"] == 0 and out["pp_position"] == 5 and out["tg_tokens"] == 3


def test_measure_warms_up_at_depth_zero_only() -> None:
    eng = FakeEngine()
    runners.measure(eng, [1] * 40, [2] * 3, depths=[8], depth_ids=list(range(8)))
    assert eng.calls[:3] == [("reset", 0), ("prefill", runners.WARMUP_PROMPT), ("decode", 2)]
    assert eng.calls[3:5] == [("reset", 0), ("prefill", 8)]


def test_measure_needs_enough_depth_ids() -> None:
    with pytest.raises(ValueError, match="depth 10"):
        runners.measure(FakeEngine(), [1], [2], depths=[10], depth_ids=[1, 2])


def test_depth_and_batch_ids_are_fixed_per_seed() -> None:
    a = runners.depth_token_ids(1000, 50, 7)
    assert a == runners.depth_token_ids(1000, 50, 7) != runners.depth_token_ids(1000, 50, 8)
    assert runners.depth_token_ids(1000, 20, 7) == a[:20]  # shallower depths: prefixes
    p = runners.batch_prompts(1000, 4, 7)
    assert len(p) == 4 and {len(x) for x in p} == {runners.BATCH_PROMPT}
    assert len({tuple(x) for x in p}) == 4  # each sequence its own prompt
    assert runners.batch_prompts(1000, 2, 7) == p[:2]


# -- measure_batch(), on a fake batch engine -------------------------------------------------


class FakeBatch:
    """B sequences; each step's logits point at (previous token + 1): greedy feeds that back."""

    def __init__(self, vocab: int = 50) -> None:
        self.vocab = vocab
        self.pos: list[int] = []
        self.fed: list[list[int]] = []
        self.rewound: list[int] = []

    def _logits(self, nxt: list[int]) -> np.ndarray:
        x = np.zeros((len(nxt), self.vocab), np.float32)
        x[np.arange(len(nxt)), np.asarray(nxt) % self.vocab] = 1.0
        return x

    def start(self, prompts: list[list[int]]) -> np.ndarray:
        self.pos, self.fed = [len(p) for p in prompts], []
        return self._logits([p[-1] + 1 for p in prompts])

    def step(self, token_ids: list[int]) -> np.ndarray:
        self.fed.append(list(token_ids))
        self.pos = [p + 1 for p in self.pos]
        return self._logits([t + 1 for t in token_ids])

    def rewind(self, n: int) -> None:
        self.rewound.append(n)
        self.pos = [n] * len(self.pos)

    def positions(self) -> list[int]:
        return list(self.pos)


def test_measure_batch_steps_every_sequence_with_its_greedy_token() -> None:
    fake = FakeBatch()
    prompts = [[i] * 4 for i in range(0, 40, 10)]  # last tokens 0, 10, 20, 30
    rows = runners.measure_batch(fake, [1, 4], prompts, 5, warmup=True)
    assert [r["batch"] for r in rows] == [1, 4]
    assert fake.rewound == [4, 4]  # warm-up steps forgotten for both sizes
    assert rows[1]["positions"] == [4 + 5] * 4 and rows[1]["tg_tokens"] == 5
    assert rows[1]["first_tokens"] == [1, 11, 21, 31]
    assert rows[1]["last_tokens"] == [6, 16, 26, 36]  # 5 greedy steps of +1
    # the timed steps fed each sequence its own previous greedy token
    assert fake.fed[-5:] == [[k + 1, k + 11, k + 21, k + 31] for k in range(5)]
    assert all(r["tg_s"] >= 0 for r in rows)


# -- the runners on a tiny model -------------------------------------------------------------


def _job(engine: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "engine": engine,
        "model": str(path),
        "threads": 1,
        "pp_ids": [3, 1, 4, 1, 5, 9, 2, 6],
        "tg_ids": [32000, 11, 32000, 12],
        "max_context": 128,
        "warmup": True,
        "seed": 11,
        "n_vocab": 32064,
        **extra,
    }


def _numpy_has_step_batch() -> bool:
    import fallback.model

    return callable(getattr(fallback.model.NumpyModel, "step_batch", None))


def test_numpy_runner_at_depths_and_batches(tiny_phi3: Path) -> None:
    if not _numpy_has_step_batch():
        pytest.skip("the NumPy backend has no step_batch (the batched step of the protocol)")
    r = runners.run_job(_job("numpy", tiny_phi3, depths=[0, 24, 48], batch=[1, 2, 5]))
    assert r["ok"], r.get("error")
    rows = r["depths"]
    assert [x["depth"] for x in rows] == [0, 24, 48]
    assert [x["pp_position"] for x in rows] == [8, 32, 56]
    assert [x["tg_position"] for x in rows] == [4, 28, 52]
    assert all(x["pp_s"] > 0 and x["tg_s"] > 0 for x in rows)
    assert all(0 <= x["first_token"] < 32064 for x in rows)
    batch = r["batch"]
    assert [x["batch"] for x in batch] == [1, 2, 5] and "batch_error" not in r
    for x in batch:
        assert x["positions"] == [runners.BATCH_PROMPT + 4] * x["batch"]
        assert x["tg_tokens"] == 4 and x["tg_s"] > 0
    # a sequence's continuation is its own: sequence 0 starts alike in every batch
    assert {x["first_tokens"][0] for x in batch} == {batch[0]["first_tokens"][0]}


def test_runner_without_step_batch_skips_the_batch_and_says_why(tiny_phi3: Path) -> None:
    class NoBatch:  # a loaded model of a backend without the batched step
        def new_session(self, max_context: int) -> None:
            return None

    adapter = runners.PhimlxAdapter.__new__(runners.PhimlxAdapter)
    adapter.loaded = NoBatch()
    out = runners._run_batch("numpy", adapter, [1, 2], 4, 100, 0, {"threads": 1})
    assert out["batch"] == [] and "has no step_batch" in out["batch_skipped"]


def test_llama_cpp_runner_agrees_at_depths_and_in_batches(tiny_phi3: Path) -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        require("llama-cpp-python", "pip install llama-cpp-python")
    if not _numpy_has_step_batch():
        pytest.skip("the NumPy backend has no step_batch (the batched step of the protocol)")
    job = dict(depths=[0, 40], batch=[1, 3])
    ours = runners.run_job(_job("numpy", tiny_phi3, **job))
    theirs = runners.run_job(_job("llama.cpp", tiny_phi3, **job))
    assert theirs["ok"], theirs.get("error")
    assert [x["pp_position"] for x in theirs["depths"]] == [8, 48]
    assert [x["tg_position"] for x in theirs["depths"]] == [4, 44]
    # Same file, same depth ids and prompts: the same greedy tokens.
    assert [x["first_token"] for x in theirs["depths"]] == [
        x["first_token"] for x in ours["depths"]
    ]
    for a, b in zip(ours["batch"], theirs["batch"], strict=True):
        assert b["positions"] == [runners.BATCH_PROMPT + 4] * b["batch"]
        assert a["first_tokens"] == b["first_tokens"]


# -- the whole command -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def deep_result(tiny_phi3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not _numpy_has_step_batch():
        pytest.skip("the NumPy backend has no step_batch (the batched step of the protocol)")
    out = tmp_path_factory.mktemp("bench") / "result.json"
    argv = [str(tiny_phi3), "--backends", "numpy", "--pp", "6", "--tg", "4"]
    argv += ["--depth", "0,16,40", "--batch", "2,4", "-r", "2", "--threads", "1"]
    argv += ["--no-bandwidth", "--no-progress", "--json", str(out)]
    assert cli.main(argv) == 0
    return json.loads(out.read_text())


def test_json_has_every_depth_and_batch(deep_result: dict[str, Any]) -> None:
    s = deep_result["settings"]
    assert s["depth"] == [0, 16, 40] and s["batch"] == [1, 2, 4]  # B=1, the ratios' base
    for run in deep_result["engines"]["numpy"]["runs"]:
        assert [x["depth"] for x in run["depths"]] == [0, 16, 40]
        assert [x["pp_position"] for x in run["depths"]] == [6, 22, 46]
        assert [x["batch"] for x in run["batch"]] == [1, 2, 4]
    sm = deep_result["engines"]["numpy"]["summary"]
    assert [e["depth"] for e in sm["by_depth"]] == [0, 16, 40]
    for e in sm["by_depth"]:
        for k in ("pp_tps", "tg_tps", "ttft_s"):
            assert e[k]["n"] == 2 and 0 < e[k]["min"] <= e[k]["median"] <= e[k]["max"]
    assert sm["pp_tps"] == sm["by_depth"][0]["pp_tps"]  # the top level: the first depth
    assert [e["batch"] for e in sm["batch"]] == [1, 2, 4]
    for e in sm["batch"]:
        assert e["aggregate_tps"]["median"] > 0 and e["per_seq_tps"]["median"] > 0
        assert e["aggregate_tps"]["median"] == pytest.approx(
            e["batch"] * e["per_seq_tps"]["median"]
        )
        assert e["ratio_to_b1"] > 0
    assert sm["batch"][0]["ratio_to_b1"] == 1.0
    assert set(deep_result["ratios_to_llama_cpp_by_depth"]) == {"0", "16", "40"}


def test_table_has_a_depth_column_and_batch_rows(deep_result: dict[str, Any]) -> None:
    text = report.markdown(deep_result)
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("| engine | depth"))
    rows = [ln for ln in lines if ln.startswith("| phimlx numpy |")]
    depth_rows = [ln for ln in rows if ln.count("|") == header.count("|")]
    assert [ln.split("|")[2].strip() for ln in depth_rows] == ["0", "16", "40"]
    assert "| engine | B | aggregate tok/s | per-sequence tok/s | aggregate / B=1 |" in text
    batch_rows = [ln for ln in rows if ln.count("|") == 6]
    assert [ln.split("|")[2].strip() for ln in batch_rows] == ["1", "2", "4"]
    assert batch_rows[0].split("|")[5].strip() == "1.00"
    assert "llama-bench's -d" in text


def test_the_default_table_has_no_depth_column(deep_result: dict[str, Any]) -> None:
    flat = json.loads(json.dumps(deep_result))
    flat["settings"].update(depth=[0], batch=[])
    header = next(ln for ln in report.markdown(flat).splitlines() if ln.startswith("| engine"))
    assert header.startswith("| engine | pp6 tok/s |") and "aggregate" not in header


def test_plot_has_depths_and_batches(deep_result: dict[str, Any], tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (pip install 'phimlx[bench]')")
    report.plot(deep_result, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_summaries_of_older_results_hold_depth_zero() -> None:
    old = {"pp_tps": {"median": 1.0}, "tg_tps": None}
    assert report.at_depth(old, 0) is old and report.at_depth(old, 512) is None


# -- options and limits ------------------------------------------------------------------------


def test_list_options_parse_and_show_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["--depth", "0,1024,4096,1024", "--batch", "8,4"])
    assert args.depth == [0, 1024, 4096] and args.batch == [8, 4]
    assert cli.batch_sizes(args.batch) == [1, 4, 8] and cli.batch_sizes([]) == []
    assert cli.build_parser().parse_args([]).depth == [0]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--depth LIST" in text and "--batch LIST" in text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--depth", "4000", "--pp", "64", "--tg", "64"], "--depth 4000 + --pp 64 + --tg 64"),
        (["--depth", "1,x"], "not a comma-separated list"),
        (["--depth", "-1"], "-1 is invalid"),
        (["--batch", "0"], "0 is invalid"),
        (["--batch", "2", "--tg", "0"], "--tg of at least 1"),
    ],
)
def test_too_deep_or_bad_lists_exit_2_before_anything_runs(
    tiny_phi3: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    def no_runner(*a: object, **k: object) -> None:
        raise AssertionError("a runner started")

    monkeypatch.setattr(cli, "run_child", no_runner)
    argv = [str(tiny_phi3), "--backends", "numpy", "--no-progress", *extra]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
