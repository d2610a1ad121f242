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


def read_config_json(folder) -> dict:
    """A checkpoint's config.json as a dict, or one clear error naming what is wrong with it."""
    import json

    from latentkv.errors import LatentKVError

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LatentKVError(f"{Path(folder)} has no config.json; point at a model folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise LatentKVError(f"{path} is not valid JSON ({exc}); re-download the checkpoint or fix the file") from None
    if not isinstance(data, dict):
        raise LatentKVError(f"{path} holds a JSON {type(data).__name__}, not an object of settings; re-download the "
                            "checkpoint or fix the file")
    return data


def check_self_contained(folder, config: dict | None = None) -> None:
    """A latentkv-format folder must carry the modeling file its config's auto_map names: that is the
    code a user (`trust_remote_code=True`), an inference server or the Hub runs."""
    from latentkv.errors import LatentKVError

    folder = Path(folder)
    config = config if config is not None else read_config_json(folder)
    if config.get("model_type") != "latentkv":
        return
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map.get("AutoModelForCausalLM"):
        raise LatentKVError(f"{folder / 'config.json'} has no auto_map to its modeling code, so the model loads only "
                            "where latentkv is installed; write the folder again with `latentkv convert`")
    modules = {str(v).split("--")[-1].rsplit(".", 1)[0] for v in auto_map.values() if isinstance(v, str)}
    absent = sorted(m + ".py" for m in modules if not (folder / f"{m}.py").is_file())
    if absent:
        raise LatentKVError(
            f"{folder} lacks {', '.join(absent)}, the modeling code its config.json names: the folder does not load "
            f"on its own. Copy {MODELING_FILE.name} back (it ships in latentkv/modeling/) or convert again")


def load_model(folder, *, dtype=None, device: str = "cpu", trust_remote_code: bool = False):
    """A causal LM from a folder: latentkv outputs through this package's own code, others through
    transformers (remote code only when asked)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_config_json(folder)
    model_type = config.get("model_type")
    kwargs = {"dtype": dtype or torch.float32}
    if model_type == "latentkv":
        check_self_contained(folder, config)
        shipped = folder / MODELING_FILE.name
        if shipped.is_file() and shipped.read_bytes() == MODELING_FILE.read_bytes():
            register_latentkv()  # the code the folder ships is this package's: load it from here
            from latentkv.modeling.modeling_latentkv import LatentKVForCausalLM

            model = LatentKVForCausalLM.from_pretrained(folder, **kwargs)
        elif trust_remote_code:  # run exactly the code that ships, as a user loading the folder would
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            # by its auto_map entry: AutoModelForCausalLM would prefer a class registered in-process
            shipped_class = get_class_from_dynamic_module(config["auto_map"]["AutoModelForCausalLM"], str(folder))
            model = shipped_class.from_pretrained(folder, **kwargs)
        else:
            from latentkv.errors import LatentKVError

            raise LatentKVError(
                f"{shipped} is not the modeling code of this latentkv version (the folder was written by another "
                "version, or the file was edited); what ships is what users run, so pass --trust-remote-code to "
                "evaluate that code, or convert again to ship this version's")
    else:
        from latentkv.arch import ARCHITECTURES

        if model_type in ARCHITECTURES:  # soft-capped scores: eager attention (some releases' SDPA drops the cap)
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            if ARCHITECTURES[model_type].attention_implementation(config) == "eager":
                kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code, **kwargs)
    return model.to(device).eval()


def new_dynamic_cache(config, cache_class=None, **kwargs):
    """transformers' DynamicCache (or its subclass `cache_class`, built with **kwargs) for a model of
    `config` (older versions take no config)."""
    import inspect

    from transformers import DynamicCache

    takes_config = "config" in inspect.signature(DynamicCache.__init__).parameters
    cls = cache_class or DynamicCache
    return cls(config=config, **kwargs) if takes_config else cls(**kwargs)


def cached_forward(model, input_ids, cache, **kwargs):
    """`model(input_ids, use_cache=True)` with `cache` handed over under the keyword the model's forward
    takes (transformers renamed `past_key_values` to `cache`); returns the model's output."""
    from latentkv.modeling.modeling_latentkv import cache_keyword

    return model(input_ids, use_cache=True, **{cache_keyword(model.forward): cache}, **kwargs)


def output_cache(outputs):
    """The cache a model output carries, under whichever field name this transformers version uses."""
    from latentkv.modeling.modeling_latentkv import output_cache as field

    return field(outputs)
