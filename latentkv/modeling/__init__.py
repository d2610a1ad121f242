"""Modeling code written next to converted weights, and loading of any model latentkv handles."""

from __future__ import annotations

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_latentkv.py")
AUTO_MAP = {
    "AutoConfig": "modeling_latentkv.LatentKVConfig",
    "AutoModelForCausalLM": "modeling_latentkv.LatentKVForCausalLM",
}


def register_latentkv() -> None:
    """Let AutoConfig / AutoModelForCausalLM build latentkv models from this package (no remote code)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from latentkv.modeling.modeling_latentkv import LatentKVConfig, LatentKVForCausalLM

    try:
        AutoConfig.register("latentkv", LatentKVConfig)
        AutoModelForCausalLM.register(LatentKVConfig, LatentKVForCausalLM)
    except ValueError:
        pass  # already registered


def load_model(folder, *, dtype=None, device: str = "cpu", trust_remote_code: bool = False):
    """A causal LM from a folder: latentkv outputs through this package's own code, others through
    transformers (remote code only when asked)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from latentkv.errors import LatentKVError

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise LatentKVError(f"{folder} has no config.json; point at a model folder")
    model_type = json.loads(config_path.read_text()).get("model_type")
    kwargs = {"dtype": dtype or torch.float32}
    if model_type == "latentkv":
        register_latentkv()
        from latentkv.modeling.modeling_latentkv import LatentKVForCausalLM

        model = LatentKVForCausalLM.from_pretrained(folder, **kwargs)
    else:
        from latentkv.arch import ARCHITECTURES

        if model_type in ARCHITECTURES:  # soft-capped scores: eager attention (some releases' SDPA drops the cap)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if ARCHITECTURES[model_type].attention_implementation(config) == "eager":
                kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    return model.to(device).eval()


def new_dynamic_cache(config):
    """transformers' DynamicCache for a model of `config` (older versions take no config)."""
    import inspect

    from transformers import DynamicCache

    takes_config = "config" in inspect.signature(DynamicCache.__init__).parameters
    return DynamicCache(config=config) if takes_config else DynamicCache()


def cached_forward(model, input_ids, cache, **kwargs):
    """`model(input_ids, use_cache=True)` with `cache` handed over under the keyword the model's forward
    takes (transformers renamed `past_key_values` to `cache`); returns the model's output."""
    from latentkv.modeling.modeling_latentkv import cache_keyword

    return model(input_ids, use_cache=True, **{cache_keyword(model.forward): cache}, **kwargs)


def output_cache(outputs):
    """The cache a model output carries, under whichever field name this transformers version uses."""
    from latentkv.modeling.modeling_latentkv import output_cache as field

    return field(outputs)
