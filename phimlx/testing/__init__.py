"""Synthetic models and vocabularies for tests and `phimlx bench`.

Phi-3's weights and vocabulary cannot be downloaded everywhere these run, and speed and
correctness checks do not need them: `models` writes random-weight GGUFs with real shapes
and quant mixes, `vocab` a Phi-3-shaped SentencePiece vocabulary.  Not used at run time.
"""
