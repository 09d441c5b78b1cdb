"""Small models shipped with the package, with attention written by hand (for the
demo, the tests and benchmarks)."""
from .gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
