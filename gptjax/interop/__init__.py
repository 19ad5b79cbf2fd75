"""Interop: Hugging Face import / export (``hf.py`` and one mapping file per family) and LoRA adapters."""
