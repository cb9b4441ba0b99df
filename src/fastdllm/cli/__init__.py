"""The `fastdllm` command line: one module per command over the shared flags (see main.py)."""

from .main import main

__all__ = ["main"]
