"""Tiny random models for the tests: see mergekit_fast.testing (shared with the demo)."""

from mergekit_fast.testing import ARCHITECTURES, make_model, write_tokenizer

__all__ = ["ARCHITECTURES", "make_model", "write_tokenizer"]
