"""Serve Qwen3-VL-235B-A22B-Thinking-FP8 with vLLM inside a SLURM allocation."""

__version__ = "0.1.0"
