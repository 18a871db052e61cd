"""Inference backends a role worker can serve from (local transformers, scripted replay)."""
