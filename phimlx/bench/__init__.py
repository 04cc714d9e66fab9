"""Benchmarks: tokens/s of phimlx's backends and of llama.cpp, mlx-lm and transformers.

``phimlx bench --model SmolLM2 --backends numpy,llama.cpp`` (see ``phimlx bench --help``).
Each engine runs in its own process per repetition (`phimlx.bench.runners`); the
orchestrator (`phimlx.bench.cli`) alternates them and reports medians with min and max.
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
