"""`ConvertFlags`: the flags of `latentkv convert` besides the calibration ones (`CalibOptions`). Each
field is a flag (`setting`, `latentkv.schema`); the CLI maps them onto `ConvertOptions` (the method's
widths and `--set` go into its `method_options`). Nothing heavy is imported."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from latentkv.convert.registry import target_help
from latentkv.schema import DEVICE, DTYPE, GGUF_FILE, OVERWRITE, TRUST_REMOTE_CODE, setting

METHOD, OUTPUT = "Method", "Output"  # help panels


@dataclass
class ConvertFlags:
    """What `latentkv convert` is told on its command line (a recipe may set the same names)."""

    to: str = setting("mla", help=target_help())
    kv_lora_rank: int | None = setting(None, panel=METHOD, help=(
        "Latent width per layer (MLA/GLA; the value latent of GTA-S)."))
    kv_budget: float | None = setting(None, panel=METHOD, help=(
        "Fraction of the source KV cache to keep (0-1]; widths then per layer. Default 0.5 when no "
        "--kv-lora-rank is given (MLA, GLA)."))
    qk_rope_dim: str = setting("auto", panel=METHOD, help=(
        "Width of the cached RoPE key (even), or 'auto' (chosen per layer from the statistics; latentkv format)."))
    latent_heads: int | None = setting(None, panel=METHOD, help="GLA latent heads (must divide the query heads).")
    num_kv_heads: int | None = setting(None, panel=METHOD, help="GQA target: KV heads to keep.")
    method_option: list[str] | None = setting(None, panel=METHOD, opts=("--set",), help=(
        "Extra method setting KEY=VALUE (e.g. --set rope_mix=real); repeatable."))
    sequential: bool = setting(False, panel=METHOD, help=(
        "Sequential calibration: each layer sees the converted layers before it (one pass; with --set "
        "refit_output=true the best one-shot quality)."))
    format: str = setting("latentkv", panel=OUTPUT, help=(
        "latentkv (self-contained remote code) or deepseek (stock DeepseekV3)."))
    engine: str | None = setting(None, panel=OUTPUT, help=(
        "Serving engine of the --format deepseek export (vllm-cpu, vllm-triton-mla, vllm-flashmla, sglang-fa3, "
        "...; see `latentkv inspect`): the cache gets a geometry it runs, or the conversion is refused before "
        "any work."))
    cache_format: str | None = setting(None, panel=OUTPUT, help=(
        "KV cache format the output carries in its config, honoured by its modeling file, `latentkv eval` and "
        "the paged decode kernels: a latent format (fp8_e4m3/g<N>, int4/g<N>, fp8_e4m3/head, int4/head, bf16, "
        "fp16; N a power of 2) with the RoPE key at bf16, or latent=FORMAT,rope=bf16|fp16."))
    recipe: Path | None = setting(None, help="YAML file with these same settings (flags given on the command line win).")
    device: str = setting("cpu", **DEVICE)
    dtype: str = setting("float32", **DTYPE)
    save_dtype: str | None = setting(None, panel=OUTPUT, help="dtype of the written weights (default: the source's).")
    max_shard_size: str = setting("5GB", panel=OUTPUT, help="Largest safetensors shard, e.g. 5GB.")
    overwrite: bool = setting(False, **OVERWRITE)
    gguf_file: str | None = setting(None, **GGUF_FILE)
    trust_remote_code: bool = setting(False, **TRUST_REMOTE_CODE)
    verbose: bool = setting(False, opts=("-v", "--verbose"), help="Log every decision (ranks per layer...).")
