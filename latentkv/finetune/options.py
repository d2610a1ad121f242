"""The typed options of `latentkv finetune` and what a run returns.

A field declared with `setting` is a flag of `latentkv finetune` (its help text and panel are here,
the CLI generates the option from it: `latentkv.schema`); the others a recipe may set. Nothing here
parses arguments, and nothing heavy is imported (`--help` stays instant).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from latentkv.calibration.options import SEED, SPLIT, TEXT_FIELD
from latentkv.data import DEFAULT_CALIBRATION
from latentkv.errors import LatentKVError
from latentkv.schema import DEVICE, GGUF_FILE, OVERWRITE, SOURCE, TRUST_REMOTE_CODE, setting

MODES = ("lora", "attention")
TARGETS = ("attention", "attention+mlp")
PRECISIONS = ("auto", "bf16", "fp32")
DATA, TRAINING, EVALUATION = "Data", "Training", "Evaluation"  # help panels

# Fields that change what is trained: a checkpoint made with other values cannot be resumed.
_RESUME_KEYS = (
    "model", "data", "split", "text_field", "teacher", "mode", "target", "lora_rank", "lora_alpha",
    "lora_dropout", "tokens", "seq_len", "batch_size", "lr", "warmup", "min_lr_ratio", "weight_decay",
    "max_grad_norm", "temperature", "lm_weight", "hidden_weight", "transfer_tokens", "transfer_lr", "anneal_rank",
    "anneal_tokens", "mlp_lr_scale", "seed", "precision",
)


@dataclass
class FinetuneOptions:
    """One healing run of a converted model: LoRA or full attention weights, distilled from a teacher.

    model: the converted model folder (latentkv or deepseek format).
    output: where the result goes (adapter, or merged weights in the model's own format).
    data / split / text_field: training text, as for calibration (local .txt/.jsonl/.parquet file or
        folder, or a `datasets` name); packed into `seq_len`-token sequences. WikiText is refused.
    teacher: the model to distil from (usually the source of the conversion: a folder, .gguf or Hub
        id). None trains on the LM loss alone.
    mode: "lora" (peft adapters on the target modules) or "attention" (the target modules' full
        weights; the rest stays frozen). "attention" always writes full weights.
    target: "attention" (the converted attention's linears) or "attention+mlp" (the MLP's too).
    lora_rank / lora_alpha / lora_dropout: the adapters' width (4..128), scale (None: alpha = rank,
        so the update is scaled by 1) and dropout (0..0.1).
    tokens: training tokens in all (the global budget, summed over GPUs); 1e6..1e10 is sensible.
    seq_len: tokens per packed sequence (256..4096).
    batch_size: sequences per optimizer step, summed over GPUs (so runs on 1 or 8 GPUs match).
    micro_batch_size: sequences per forward pass on one GPU (None: the whole per-GPU share);
        lower it when memory runs out; gradients are accumulated up to `batch_size`.
    lr: peak learning rate (None: 1e-4); warmup: fraction of the
        steps with a linear warm-up (0..0.2); then cosine decay down to lr x min_lr_ratio.
    mlp_lr_scale: with `target="attention+mlp"`, the MLP's learning rate as a fraction of `lr` (0..1]:
        the MLP keeps the source's weights and needs a smaller step than the new attention.
    weight_decay, max_grad_norm: AdamW decay of the trained weights; gradient clipping (0 = off).
    temperature: softening of both distributions in the KL term (1..4; the KL is scaled by T^2).
    lm_weight: loss = (1 - lm_weight) * KL(teacher || student) + lm_weight * next-token CE (0..1).
    transfer_tokens: tokens of the `tokens` budget spent first on attention transfer (0 = off): every
        converted attention layer trained alone to give the teacher's attention output from the
        teacher's input to that layer (latentkv/finetune/transfer.py); the KL phase takes the rest.
        Needs a teacher with the student's layers. On SmolLM2 (20M tokens in all) 4M of transfer
        ended no better than the KL alone (GTA-T 34.02 vs 33.81; benchmarks/heal_transfer_h100.md).
    transfer_lr: peak learning rate of the transfer phase (None: the same as `lr`); it has its own
        warm-up and cosine decay, and the optimizer's moments restart when the KL phase begins.
    anneal_rank: MLA only (mode "attention"): the latent width the written model keeps. The model
        comes converted at a larger rank with the same RoPE key (e.g. `--kv-budget 0.5 --set
        qk_rope_dim=24`); latent dimensions past `anneal_rank` fade linearly to zero over the first
        `anneal_tokens` tokens (None: half of `tokens`) and are dropped from the output
        (latentkv/finetune/anneal.py). On SmolLM2, 50% -> 25% over 8M of 20M tokens ended where a
        direct 25% conversion did (46.01 vs 45.74; benchmarks/heal_anneal_h100.md).
    hidden_weight: weight of the match of every decoder layer's hidden state to the teacher's
        (relative squared error, mean over layers; 0 = off). Needs a teacher of the same depth and width.
        On GTA-T from SmolLM2 (20M tokens) a weight of 10 ended worse than the KL alone (docs/healing.md).
    precision: "auto" (bf16 autocast on GPU, fp32 on CPU), "bf16" or "fp32".
    gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
    compile: torch.compile the student and teacher (faster steps after a warm-up of tens of seconds).
    checkpoint_every: optimizer steps between resumable checkpoints (0 = only when stopped early),
        written to `<output>.checkpoints/`; rerunning the same command resumes from the last one.
    keep_checkpoints: how many checkpoints to keep; keep_checkpoints_after: keep the folder when done.
    stop_after_steps: stop (with a checkpoint) after this many steps in this process; rerun to go on.
    stop_after_seconds: stop (with a checkpoint) before this many seconds since the start of this
        process would pass, judged from the last step's, evaluation's and checkpoint's durations (at
        least one step is always made); rerun to go on. Lets a long run proceed in fixed time windows.
    merge: fold the LoRA adapters into the weights and write the model's own format (else the
        adapter alone is written).
    eval_text / eval_windows / eval_window: the perplexity protocol measured before and after (and
        at `eval_at` token counts during training); eval_windows = 0 skips it. A 0 in `eval_at`
        records the untrained model as the first evaluation.
    kl_text / kl_windows / kl_window: held-out text (not the training text) on which every evaluation
        also measures KL(teacher || student) in nats per token, over kl_windows x kl_window tokens.
    """

    model: str = setting(argument=True, help="Converted model folder (latentkv or deepseek format).")
    output: str = setting(argument=True, cli_type=Path, help="Output folder (must be empty unless --overwrite).")
    data: str = setting(DEFAULT_CALIBRATION, panel=DATA, help="Training text: file/folder or datasets name (WikiText refused).")
    split: str = setting("train", **SPLIT)
    text_field: str = setting("text", **TEXT_FIELD)
    teacher: str | None = setting(None, help="Model to distil from (usually the conversion's source).")
    mode: str = setting("lora", panel=TRAINING, help="lora (peft adapters) or attention (full weights of the new attention only).")
    target: str = setting("attention", panel=TRAINING, help=(
        "attention: latentkv format q_proj, kv_a_proj, kv_b_proj, o_proj (deepseek: q_proj, kv_a_proj_with_mqa, "
        "kv_b_proj, o_proj); attention+mlp adds the MLP."))
    lora_rank: int = setting(32, panel=TRAINING, help="LoRA rank.")
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    tokens: int = setting(20_000_000, panel=TRAINING, help="Training tokens in all.")
    seq_len: int = setting(1024, panel=TRAINING, help="Tokens per packed sequence.")
    batch_size: int = setting(64, panel=TRAINING, help="Sequences per optimizer step (all GPUs).")
    micro_batch_size: int | None = setting(None, panel=TRAINING, help="Sequences per forward on one GPU.")
    lr: float | None = setting(None, panel=TRAINING, help="Peak learning rate (default 1e-4).")
    warmup: float = setting(0.05, panel=TRAINING, help="Warm-up fraction, then cosine decay.")
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = setting(1.0, panel=TRAINING, help="KL temperature.")
    lm_weight: float = setting(0.0, panel=TRAINING, help="Weight of the LM loss against the KL to the teacher (0-1).")
    hidden_weight: float = setting(0.0, panel=TRAINING, help=(
        "Experimental (measured no better than KL alone, docs/healing.md): weight of matching every layer's hidden "
        "state to the teacher's (0 = off)."))
    anneal_rank: int | None = setting(None, panel=TRAINING, help=(
        "Experimental (measured no better than converting narrow, docs/healing.md). MLA, --mode attention: latent width "
        "to keep; the dims past it fade to zero over --anneal-tokens and are "
        "dropped from the output (convert wider first, same --qk-rope-dim)."))
    anneal_tokens: int | None = setting(None, panel=TRAINING, help=(
        "Tokens over which --anneal-rank fades the extra latent dims (default: half of --tokens)."))
    transfer_tokens: int = setting(0, panel=TRAINING, help=(
        "Experimental (measured no better than KL alone, docs/healing.md): tokens of --tokens spent first on attention "
        "transfer (each attention layer trained alone toward the teacher's output; 0 = off)."))
    transfer_lr: float | None = setting(None, panel=TRAINING, help=(
        "Peak learning rate of the attention-transfer phase (default: --lr)."))
    mlp_lr_scale: float = setting(1.0, panel=TRAINING, help=(
        "With --target attention+mlp: the MLP's learning rate as a fraction of --lr."))
    seed: int = setting(0, **SEED)
    precision: str = setting("auto", panel="Runtime", help="auto (bf16 on GPU), bf16 or fp32.")
    device: str | None = None
    gradient_checkpointing: bool = setting(False, panel=TRAINING, help="Recompute activations in backward.")
    compile: bool = setting(False, panel=TRAINING, help="torch.compile student and teacher.")
    checkpoint_every: int = setting(500, panel=TRAINING, help="Steps between resumable checkpoints.")
    keep_checkpoints: int = 2
    keep_checkpoints_after: bool = False
    stop_after_steps: int | None = setting(None, panel=TRAINING, help=(
        "Stop with a checkpoint after this many steps of this process (rerun the same command to go on)."))
    stop_after_seconds: float | None = setting(None, panel=TRAINING, help=(
        "Stop with a checkpoint before this many seconds since the start would pass (at least one step is made; "
        "rerun the same command to go on)."))
    merge: bool = setting(False, panel="Output", help="Fold LoRA into the weights and write the model's own format.")
    save_dtype: str | None = None
    max_shard_size: str = "5GB"
    eval_text: str | None = None
    eval_windows: int = setting(64, panel=EVALUATION, help="Number of evaluation windows.")
    eval_window: int = setting(512, panel=EVALUATION, help="Tokens per evaluation window.")
    eval_at: tuple[int, ...] = setting((), panel=EVALUATION, cli_type=list[int] | None, help=(
        "Token counts at which to measure perplexity during training (0: the untrained model)."))
    kl_text: str | None = setting(None, flag="kl_data", panel=EVALUATION, help=(
        "Held-out text (not the training text) on which every evaluation also measures KL(teacher || student)."))
    kl_windows: int = setting(16, panel=EVALUATION, help="Windows of --kl-data.")
    kl_window: int = setting(512, panel=EVALUATION, help="Tokens per --kl-data window.")
    log_every: int = 10
    overwrite: bool = setting(False, **OVERWRITE)
    trust_remote_code: bool = setting(False, **TRUST_REMOTE_CODE)
    teacher_gguf_file: str | None = None
    command: str = ""

    def __post_init__(self):
        if self.mode not in MODES:
            raise LatentKVError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.target not in TARGETS:
            raise LatentKVError(f"--target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.precision not in PRECISIONS:
            raise LatentKVError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name, low in (("tokens", 1), ("seq_len", 2), ("batch_size", 1), ("lora_rank", 1), ("log_every", 1)):
            if int(getattr(self, name)) < low:
                raise LatentKVError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        self.tokens = int(self.tokens)
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise LatentKVError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if not 0 <= self.lm_weight <= 1:
            raise LatentKVError(f"--lm-weight must be in [0, 1], got {self.lm_weight}")
        if self.teacher is None and self.lm_weight < 1:
            # Without a teacher the only loss there is is the LM loss.
            self.lm_weight = 1.0
        if self.hidden_weight < 0:
            raise LatentKVError(f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        if self.hidden_weight > 0 and self.teacher is None:
            raise LatentKVError("--hidden-weight matches the teacher's hidden states: pass --teacher too")
        self.transfer_tokens = int(self.transfer_tokens)
        if not 0 <= self.transfer_tokens < self.tokens:
            raise LatentKVError(f"--transfer-tokens is the part of --tokens ({self.tokens}) spent on attention transfer "
                                f"first; it must be in [0, {self.tokens}), got {self.transfer_tokens}")
        if self.transfer_tokens and self.teacher is None:
            raise LatentKVError("--transfer-tokens trains each attention layer toward the teacher's: pass --teacher too")
        if self.anneal_rank is not None:
            if self.anneal_rank < 1 or self.mode != "attention":
                raise LatentKVError(f"--anneal-rank must be >= 1 and needs --mode attention (the latent's own weights "
                                    f"fade), got {self.anneal_rank} with --mode {self.mode}")
            self.anneal_tokens = int(self.anneal_tokens if self.anneal_tokens is not None else self.tokens // 2)
            if not 0 < self.anneal_tokens <= self.tokens:
                raise LatentKVError(f"--anneal-tokens must be in (0, --tokens], got {self.anneal_tokens}")
        elif self.anneal_tokens is not None:
            raise LatentKVError("--anneal-tokens sets how fast --anneal-rank narrows the latent: pass --anneal-rank too")
        if self.transfer_lr is not None and self.transfer_lr <= 0:
            raise LatentKVError(f"--transfer-lr must be > 0, got {self.transfer_lr}")
        if not 0 < self.mlp_lr_scale <= 1:
            raise LatentKVError(f"--mlp-lr-scale is a fraction of --lr in (0, 1], got {self.mlp_lr_scale}")
        if self.temperature <= 0:
            raise LatentKVError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 <= self.warmup < 1:
            raise LatentKVError(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LatentKVError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.lora_dropout < 1:
            raise LatentKVError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lr is None:
            # attention: 3e-4 made a short run (3M tokens) worse than the one-shot model on SmolLM2-135M
            # (158.69 -> 697), 1e-4 healed it (-> 65.3) and at 20M tokens costs ~2% against 3e-4
            # (benchmarks/heal_multi_gpu.md); lora: 5e-4 at scale alpha/r = 2 diverged there.
            self.lr = 1e-4
        if self.lr <= 0:
            raise LatentKVError(f"--lr must be > 0, got {self.lr}")
        if self.transfer_lr is None:
            self.transfer_lr = self.lr
        if self.lora_alpha is None:
            self.lora_alpha = float(self.lora_rank)
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise LatentKVError("--checkpoint-every must be >= 0 and --keep-checkpoints >= 1")
        if self.stop_after_steps is not None and self.stop_after_steps < 1:
            raise LatentKVError(f"--stop-after-steps must be >= 1, got {self.stop_after_steps}")
        if self.eval_windows < 0 or self.eval_window < 2:
            raise LatentKVError("--eval-windows must be >= 0 and --eval-window >= 2")
        if self.stop_after_seconds is not None and not self.stop_after_seconds > 0:
            raise LatentKVError(f"--stop-after-seconds must be > 0, got {self.stop_after_seconds}")
        self.eval_at = tuple(sorted({int(t) for t in self.eval_at}))
        if any(t < 0 for t in self.eval_at):
            raise LatentKVError(f"--eval-at takes token counts >= 0, got {min(self.eval_at)}")
        if self.kl_text is not None:
            if self.teacher is None:
                raise LatentKVError("--kl-data measures the KL to the teacher: pass --teacher too")
            if self.kl_windows < 1 or self.kl_window < 2:
                raise LatentKVError("--kl-windows must be >= 1 and --kl-window >= 2")
            check_held_out(self.kl_text, self.data)

    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser().absolute()

    @property
    def checkpoint_dir(self) -> Path:
        """Resumable checkpoints live beside the output (the output folder appears only when done)."""
        p = self.output_path
        return p.with_name(p.name + ".checkpoints")

    @property
    def log_file(self) -> Path:
        p = self.output_path
        return p.with_name(p.name + ".log")

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with this run to be resumed."""
        d = asdict(self)
        key = {k: d[k] for k in _RESUME_KEYS}
        for name, default in (("hidden_weight", 0.0), ("mlp_lr_scale", 1.0), ("transfer_tokens", 0),
                              ("anneal_rank", None), ("anneal_tokens", None)):
            if key[name] == default:  # added later: checkpoints written before it had the default
                del key[name]
        if not self.transfer_tokens:
            del key["transfer_lr"]
        return key

    def recipe(self) -> dict:
        d = asdict(self)
        for k in ("output", "overwrite", "command", "stop_after_steps", "stop_after_seconds", "keep_checkpoints_after"):
            d.pop(k)
        return d


# What a finetune recipe records but never sets: the model to heal is the command's argument, and code
# from a checkpoint runs only when the command line asks; where and whether to write is the command's.
RECIPE_RECORD_ONLY = ("model", "trust_remote_code", "latentkv_version")
RECIPE_NOT_SETTABLE = ("output", "overwrite", "command")


def recipe_settings(recipe: dict, where: str) -> dict:
    """The `FinetuneOptions` fields a `finetune --recipe` file sets, typed: a mapping of those fields,
    or a `latentkv_recipe.yaml` that finetune wrote (its `finetune` section, `FinetuneOptions.recipe()`),
    so running again from it resolves to the same options."""
    from dataclasses import fields

    from latentkv.typed import typed_settings

    if isinstance(recipe.get("finetune"), dict):
        recipe = recipe["finetune"]
    out = {k: v for k, v in recipe.items() if k not in RECIPE_RECORD_ONLY}
    known = sorted({f.name for f in fields(FinetuneOptions)} - set(RECIPE_RECORD_ONLY) - set(RECIPE_NOT_SETTABLE))
    unknown = sorted(set(out) - set(known))
    if unknown:
        raise LatentKVError(f"Unknown finetune recipe keys in {where}: {', '.join(map(str, unknown))}; known: "
                            f"{', '.join(known)} (the output folder and --overwrite are given on the command line)")
    return typed_settings(FinetuneOptions, out, "finetune recipe")


def check_held_out(held_out: str, data: str) -> None:
    """Refuse held-out text that is the training text or lies inside it (a file of a --data folder)."""
    from latentkv.data import resolve_text

    h, d = Path(resolve_text(held_out)).expanduser().absolute(), Path(resolve_text(data)).expanduser().absolute()
    if h == d or d in h.parents:
        raise LatentKVError(f"--kl-data {held_out} is part of the training text {data}; the KL must be measured on "
                            "held-out text (e.g. `latentkv sample` with another --seed)")


@dataclass
class SampleOptions:
    """What `latentkv sample` draws from the teacher: `tokens` in all, in rows of `seq_len` sampled
    `batch_size` at a time (each a round), cut into documents at EOS; a partial output file with the
    same `resume_key` is continued."""

    teacher: str = setting(**SOURCE)  # folder, .gguf file or Hub id
    output: str = setting(argument=True, cli_type=Path, help="JSONL file to write ({\"text\": ...} per document).")
    tokens: int = setting(5_000_000, help="Tokens to sample in all.")
    seq_len: int = setting(1024, help="Tokens per sampled row (cut into documents at EOS).")
    batch_size: int = setting(512, help="Rows sampled together.")
    temperature: float = setting(1.0, help="Sampling temperature (1 = the teacher's own distribution).")
    seed: int = setting(0, help="Sampling seed (round r of rows draws from seed and r).")
    device: str = setting("cpu", **DEVICE)
    dtype: str = setting("auto", panel=DEVICE["panel"], help=(
        "auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16."))
    overwrite: bool = setting(False, panel="Output", help="Replace an existing file.")
    gguf_file: str | None = setting(None, **GGUF_FILE)
    trust_remote_code: bool = setting(False, **TRUST_REMOTE_CODE)

    def __post_init__(self):
        from latentkv.calibration.runner import check_device, resolve_dtype  # torch: only when sampling

        if not str(self.output).endswith(".jsonl"):
            raise LatentKVError(f"The output is a JSONL file; name it *.jsonl (got {self.output})")
        for name in ("tokens", "seq_len", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise LatentKVError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise LatentKVError(f"--temperature must be > 0, got {self.temperature}")
        check_device(self.device)
        if self.dtype != "auto":
            resolve_dtype(self.dtype)

    @property
    def rounds(self) -> int:
        return -(-int(self.tokens) // (self.batch_size * self.seq_len))

    def resume_key(self) -> dict:
        """What must match for a partial file to be continued."""
        keep = ("teacher", "seq_len", "batch_size", "temperature", "seed", "dtype")
        return {k: v for k, v in asdict(self).items() if k in keep}


@dataclass
class FinetuneResult:
    """What a run did: where it wrote, how far it got, how fast, and the perplexities measured."""

    output: Path | None  # None when stopped early (stop_after_steps): only checkpoints were written
    steps: int
    total_steps: int
    tokens: int
    seconds: float
    tokens_per_s: float  # steady state (first steps after start/resume left out), all GPUs together
    flops_per_token: float
    mfu: float | None  # against the device's dense bf16 peak (None when unknown)
    trainable_params: int
    evals: list[dict] = field(default_factory=list)  # {"tokens": ..., "perplexity": ...}
    before: float | None = None
    after: float | None = None
    teacher_perplexity: float | None = None
    resumed_from: int | None = None
    notes: list[str] = field(default_factory=list)
