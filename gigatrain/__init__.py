"""gigatrain: train GPT-style language models, from one CPU to thousands of GPUs."""

__version__ = "0.1.0"
