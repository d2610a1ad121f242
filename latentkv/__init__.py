"""latentkv: rewrite the attention of trained LLMs so their KV cache is a fraction of the original."""

__version__ = "0.1.0"
