"""Turn a matched attention site into an :class:`AttentionSpec`."""
from .spec import AttentionSpec, CapturedTensor

__all__ = ["AttentionSpec", "CapturedTensor"]
