"""Speculative decoding (QSpec and draft-model speculation) — built on ggml_py graphs in later issues."""
