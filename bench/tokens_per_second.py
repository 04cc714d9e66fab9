"""Tokens/s of phimlx's backends and its peers: `phimlx bench`, runnable from a checkout.

    python bench/tokens_per_second.py --model SmolLM2 --backends numpy,llama.cpp
    python bench/tokens_per_second.py --model phi3-mini:Q4_K_M --threads 2 --json out.json

See `python bench/tokens_per_second.py --help` and `phimlx.bench` for the conventions.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phimlx.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
