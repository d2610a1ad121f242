"""Publishing outputs to the Hugging Face Hub (no torch import here)."""

from latentkv.hub.push import push_folder

__all__ = ["push_folder"]
