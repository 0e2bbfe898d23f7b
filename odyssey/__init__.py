"""Odyssey: own a 1.2B-parameter Llama on a small CPU machine (create, LoRA fine-tune, merge, export)."""

__version__ = "0.1.0"
