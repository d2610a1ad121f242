"""Tiny random models of every supported architecture, built in seconds for the invariant tests."""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Tiny Shakespeare (public domain; tests/fixtures/README.md): small, fast text for the tiny models.
TINY_TEXT = Path(__file__).resolve().parent / "fixtures" / "tinyshakespeare.txt"

VOCAB = 256

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

# One row per architecture case; the tests are generic over this table.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "llama3-scaled": (
        "LlamaConfig",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4)),
    "llama-tied": ("LlamaConfig", dict(tie_word_embeddings=True)),  # the LM head is the embedding (SmolLM2)
    # 8 KV heads of 128 (2048 K/V values per layer, as Llama-3 8B): 512+64, the one MLA geometry every
    # serving engine runs, is a saving here. The K/V span only hidden_size + 1 dims: the latent fits exactly.
    "llama-wide-heads": ("LlamaConfig", dict(num_attention_heads=8, num_key_value_heads=8, head_dim=128)),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", dict()),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("Phi3Config", dict()),  # fused qkv_proj and gate_up_proj
    "phi3-partial": ("Phi3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                          "partial_rotary_factor": 0.5})),
    "gemma": ("GemmaConfig", dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
    # GPT-NeoX (Pythia): MHA, fused per-head query_key_value, biases, LayerNorms; no head_dim or
    # num_key_value_heads in its config (None drops a common key). RoPE on 1/4 (Pythia) or 1/2 of each head.
    "gpt_neox": ("GPTNeoXConfig", dict(num_key_value_heads=None, head_dim=None, use_parallel_residual=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 0.25})),
    "gpt_neox-serial": ("GPTNeoXConfig", dict(num_key_value_heads=None, head_dim=None, use_parallel_residual=False,
                                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.5})),
    "qwen3": ("Qwen3Config", dict()),  # per-head q_norm / k_norm before RoPE
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         attention_bias=True)),
    # Gemma 2: scale query_pre_attn_scalar ** -0.5, soft-capped scores and logits (caps small enough to
    # bend these scores), layer 0 sliding over 16 tokens, layer 1 full.
    "gemma2": ("Gemma2Config", dict(hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                                    query_pre_attn_scalar=24, attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                                    sliding_window=16, layer_types=["sliding_attention", "full_attention"])),
    # Gemma 3 text: per-head (1 + w) q/k norms, a local RoPE (theta 1e4) on the sliding layer and a
    # linearly scaled global one (theta 1e6) on the full layer, one KV head.
    "gemma3_text": ("Gemma3TextConfig", dict(
        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, query_pre_attn_scalar=24, num_key_value_heads=1,
        sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}})),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0])),  # layer 1 applies no RoPE
    "olmo2": ("Olmo2Config", dict()),  # q/k RMSNorm over all heads at once
    # Mistral-NeMo style: head_dim 32 is not hidden / heads (16)
    "mistral-head-dim": ("MistralConfig", dict(sliding_window=None, head_dim=32)),
}


def load_script(name: str):
    """The module of scripts/<name>.py (the scripts are not a package), registered under ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


def build_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on Shakespeare, so eval/calibration paths run for real."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(TINY_TEXT)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(folder)


def build_tiny_model(name: str, folder: Path, seed: int = 0, dtype=torch.float32, **overrides):
    """Write a random model of case `name` (a key of TINY_CONFIGS) to `folder`; returns the model.
    `overrides`: config fields changed from the case's (e.g. a wider hidden size)."""
    import transformers
    from transformers import GenerationConfig

    cls_name, extra = TINY_CONFIGS[name]
    fields = {**_COMMON, **extra, **overrides}
    config = getattr(transformers, cls_name)(**{k: v for k, v in fields.items() if v is not None})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Biases are zero-initialised by HF; make them matter so bias handling is really tested.
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.normal_(0.0, 0.5)
            elif pname.endswith(("q_norm.weight", "k_norm.weight")):  # per-head norms (Qwen3): not all ones
                p.uniform_(0.5, 1.5)
            elif p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0, max_new_tokens=16).save_pretrained(folder)
    build_tokenizer(folder)
    return model


def damaged_copy(model_dir: Path, out: Path, tensor_part: str, seed: int = 0) -> Path:
    """A copy of a converted model with noise (one weight std) on every tensor whose name contains
    `tensor_part`, so that distillation from the source has something to repair."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    for name, w in weights.items():
        if tensor_part in name:
            w.add_(torch.randn(w.shape, generator=gen) * w.std())
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def short_training_text(folder: Path) -> Path:
    """~16 windows of 64 tokens of TINY_TEXT: the same few batches every epoch of a healing test."""
    text = folder / "train.txt"
    text.write_text(TINY_TEXT.read_text(encoding="utf-8")[:4000], encoding="utf-8")
    return text


def heal_adapter_and_merged(model_dir: Path, teacher_dir: Path, tmp_path: Path) -> tuple[Path, Path, list, float]:
    """LoRA healing of a (damaged) converted model on `short_training_text`, distilled from
    `teacher_dir`: the adapter alone, then the same run merged. Returns (adapter folder, merged
    folder, the adapter run's KL per step, max |merged - adapter| / max |adapter| over the logits)."""
    from latentkv.finetune import FinetuneOptions, finetune, load_adapter
    from latentkv.modeling import load_model

    base = dict(model=str(model_dir), data=str(short_training_text(tmp_path)), teacher=str(teacher_dir),
                tokens=8 * 64 * 6, seq_len=64, batch_size=8, micro_batch_size=8, lr=3e-3, warmup=0.0,
                eval_windows=0, log_every=1, checkpoint_every=0)
    kl = []
    adapter = finetune(FinetuneOptions(output=str(tmp_path / "adapter"), **base),
                       progress=lambda event, info: kl.append(info["kl"]) if event == "step" else None).output
    merged = finetune(FinetuneOptions(output=str(tmp_path / "merged"), merge=True, **base)).output
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        unmerged = load_adapter(model_dir, adapter)(input_ids=ids).logits
        folded = load_model(merged)(ids).logits
    return adapter, merged, kl, float((folded - unmerged).abs().max() / unmerged.abs().max())


def masked_attention_reference(q, kv, pages, length, ids, page, latent_heads, rope, scale=None, *,
                               return_masses=False):
    """Dense attention of one query token ([heads, r_c + rope]) over the first `length` rows of the
    cache pages `pages` (float64), with every token outside the chosen blocks `ids` masked out: what
    sparse attention must equal. ids: [k] block ids, or [latent_heads, k] the blocks of each latent
    head; scale: the softmax scale (default 1 / sqrt(r_c + rope)). return_masses: also the masses
    [latent_heads, blocks] (each block's probability, mean over the latent head's query heads)."""
    width = kv.shape[-1]
    rows = kv[torch.as_tensor(pages).long()].reshape(-1, width)[:length].double()
    ids = torch.as_tensor(ids).expand(latent_heads, -1)
    keep = torch.zeros(latent_heads, length, dtype=torch.bool)
    for c in range(latent_heads):
        for j in ids[c].tolist():
            keep[c, j * page : (j + 1) * page] = True
    heads, qw = q.shape[-2:]
    r_c = qw - rope
    hg = heads // latent_heads
    scale = 1 / math.sqrt(qw) if scale is None else scale
    n = math.ceil(length / page)
    out = torch.empty(heads, r_c, dtype=torch.float64)
    masses = torch.zeros(latent_heads, n, dtype=torch.float64)
    for h in range(heads):
        c = h // hg
        lat = rows[:, c * r_c : (c + 1) * r_c]
        sc = q[h, :r_c].double() @ lat.T + q[h, r_c:].double() @ rows[:, latent_heads * r_c :].T
        p = torch.softmax((sc * scale).masked_fill(~keep[c], float("-inf")), -1)
        out[h] = p @ lat
        masses[c] += torch.nn.functional.pad(p, (0, n * page - length)).view(n, page).sum(-1) / hg
    return (out, masses) if return_masses else out
