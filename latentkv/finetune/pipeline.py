"""`latentkv finetune`: heal a converted model by distillation from its source, as a list of steps.

load student -> check teacher -> pack data -> make trainable (LoRA / attention) -> resume ->
measure before -> train -> measure after -> write (merged model or adapter) + card + recipe.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from latentkv.errors import LatentKVError
from latentkv.finetune import targets as tg
from latentkv.finetune.data import PackedSequences
from latentkv.finetune.flops import FORMULA, device_peak_flops, flops_per_token
from latentkv.finetune.options import FinetuneOptions, FinetuneResult
from latentkv.finetune.plugins import TrainerPlugin, plugins_for
from latentkv.finetune.trainer import StepPlan, Trainer
from latentkv.io.source import check_same_tokenizer

log = logging.getLogger(__name__)


def finetune(opts: FinetuneOptions, progress=None, plugins: Sequence[TrainerPlugin] = ()) -> FinetuneResult:
    """Run (or resume) one healing run; the output folder appears only when everything succeeded.

    `progress(event, info)` is called on the main process with event "start", "step" (info: step,
    steps, tokens, loss, kl, lm, lr, tokens_per_s) or "eval" (tokens, perplexity). `plugins`: more
    `TrainerPlugin`s for the loop, called after the built-in ones `opts` asks for.
    """
    from latentkv.io.writer import OutputFolder

    t0 = time.perf_counter()
    acc = _accelerator(opts)
    # Refuse, before any work (or log file), an output that is an input (or holds one) or a folder it may not replace.
    out = OutputFolder(opts.output, overwrite=opts.overwrite, sources=(opts.model, opts.teacher, opts.data))
    model_dir = _model_dir(opts.model)
    config = _read_config(model_dir)
    check_positions(opts, config)  # before the log file: a refused run leaves nothing behind
    with _log_file(opts.log_file if acc.is_main_process else None):
        row = tg.targets_for(config)
        tokenizer = _tokenizer(model_dir, opts.trust_remote_code)
        teacher_dir = _teacher_dir(opts, tokenizer) if opts.teacher else None
        from latentkv.calibration.data import TextSource

        from latentkv.calibration.data import MIN_CHARS_READ

        # The text is read only as far as the run can use (all of it when shorter: nothing changes then).
        data = PackedSequences(tokenizer, TextSource(opts.data, opts.split, opts.text_field), opts.seq_len, opts.seed,
                               enough=(int(opts.tokens), MIN_CHARS_READ))
        plan = StepPlan.make(opts, acc.num_processes)
        autocast = _autocast_dtype(opts, acc.device)
        student = build_student(opts, model_dir, row).to(acc.device)
        teacher = _load_teacher(teacher_dir, acc.device) if teacher_dir else None
        eval_windows = _eval_windows(opts, tokenizer)
        kl_windows = _kl_windows(opts, tokenizer)
        trainer = Trainer(opts, acc, student, teacher, data, plan, autocast, eval_windows, progress,
                          kl_windows=kl_windows, started=t0, plugins=plugins_for(opts, plan) + list(plugins))
        _log_plan(opts, plan, data, trainer, student, teacher)
        trainer.resume_if_possible()
        st = trainer.state
        if st.resumed_from is None and eval_windows is not None:
            st.before = trainer.evaluate(student)
            st.teacher_perplexity = trainer.evaluate(teacher) if teacher is not None else None
            log.info("before healing: perplexity %.4g (teacher %s)", st.before, st.teacher_perplexity)
        fpt = flops_per_token(student, teacher)  # before prepare (FSDP flattens the weights)
        peak, device_name = device_peak_flops(acc.device)
        trainer.flops_per_token, trainer.peak_flops = fpt, peak * acc.num_processes if peak else None
        if st.resumed_from is None and 0 in opts.eval_at:
            st.evals.append(trainer.evaluation_record(0, student))
            if "kl" in st.evals[-1]:
                log.info("before healing: KL to the teacher %.4g on the held-out text", st.evals[-1]["kl"])
        trainer.prepare()
        trainer.run()
        tps = trainer.tokens_per_s
        mfu = tps * fpt / (peak * acc.num_processes) if peak and tps == tps else None
        result = FinetuneResult(
            output=None, steps=st.step, total_steps=plan.total_steps, tokens=st.step * plan.tokens_per_step,
            seconds=time.perf_counter() - t0, tokens_per_s=tps, flops_per_token=fpt, mfu=mfu,
            trainable_params=sum(p.numel() for p in trainer.trainable.values()), evals=list(st.evals),
            before=st.before, teacher_perplexity=st.teacher_perplexity, resumed_from=st.resumed_from,
        )
        log.info("throughput %.0f tokens/s, %.3g FLOP/token%s (%s)", tps, fpt,
                 f", MFU {100 * mfu:.1f}% of {peak / 1e12:.0f} TFLOP/s x {acc.num_processes} ({device_name})" if mfu else "",
                 FORMULA)
        if st.step < plan.total_steps:
            log.info("stopped after step %d of %d; rerun the same command to continue", st.step, plan.total_steps)
            return result
        final = [e for e in st.evals if e["tokens"] == result.tokens]
        result.after = final[-1]["perplexity"] if final else (trainer.evaluate() if eval_windows is not None else None)
        trained = trainer.trained_tensors()
        if acc.is_main_process:
            with out:
                write_output(opts, model_dir, row, trained, out.tmp, result, trainer.plugins)
            if not opts.keep_checkpoints_after:
                shutil.rmtree(opts.checkpoint_dir, ignore_errors=True)
            result.output = out.path
            log.info("wrote %s", out.path)
        acc.wait_for_everyone()
        result.seconds = time.perf_counter() - t0
    return result


# --- steps ------------------------------------------------------------------------------------

def build_student(opts: FinetuneOptions, model_dir: Path, row: tg.FormatTargets):
    """The converted model in float32 with only the chosen weights trainable (LoRA or full)."""
    from latentkv.modeling import load_model

    model = load_model(model_dir, dtype=torch.float32, device="cpu", trust_remote_code=opts.trust_remote_code)
    model.config.use_cache = False
    if opts.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(opts.seed)  # the adapters' initialisation
    if opts.mode == "lora":
        model, names = tg.add_lora(model, row, opts.target, opts.lora_rank, opts.lora_alpha, opts.lora_dropout)
    else:
        names = tg.freeze_all_but(model, row, opts.target)
    log.info("training %s of %d modules (%s ...)", "LoRA adapters" if opts.mode == "lora" else "the weights",
             len(names), ", ".join(names[:4]))
    return model.train()


def write_output(opts: FinetuneOptions, model_dir: Path, row, trained: dict, dst: Path, result: FinetuneResult,
                 plugins: Sequence[TrainerPlugin] = ()):
    """Rebuild the model on CPU with the trained tensors, let the run's plug-ins finish it, then
    merge/write it or save the adapter."""
    from latentkv.finetune.save import results_rows, write_card, write_full_model

    model = build_student(opts, model_dir, row)
    params = dict(model.named_parameters())
    unknown = sorted(set(trained) - set(params))
    if unknown:
        raise LatentKVError(f"Trained tensors {unknown[:3]} have no place in the rebuilt model; this is a bug")
    with torch.no_grad():
        for name, t in trained.items():
            params[name].copy_(t.to("cpu", params[name].dtype))
    for plugin in plugins:
        plugin.finish_model(model)
    from latentkv.eval.perplexity import PerplexityProtocol

    protocol = PerplexityProtocol(**_protocol_kwargs(opts)).describe()
    rows = results_rows(result.before, result.after, result.teacher_perplexity, protocol, result.evals)
    adapter = opts.mode == "lora" and not opts.merge
    if adapter:
        model.save_pretrained(str(dst))  # adapter_config.json + adapter_model.safetensors
    else:
        if opts.mode == "lora":
            model = model.merge_and_unload()
        save_dtype = _resolve(opts.save_dtype)
        write_full_model(model, model_dir, dst, save_dtype, opts.max_shard_size)
        config = json.loads((dst / "config.json").read_text())
        layers = getattr(model.config, "attention_layers", None)
        if layers is not None and config.get("attention_layers") != layers:  # a plug-in changed them (annealing)
            config["attention_layers"] = layers
            (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_card(dst, opts, rows, adapter, result.tokens, model_dir)
    (dst / "latentkv_finetune.json").write_text(json.dumps({
        "tokens": result.tokens, "steps": result.steps, "tokens_per_s": result.tokens_per_s,
        "flops_per_token": result.flops_per_token, "mfu": result.mfu, "before": result.before,
        "after": result.after, "teacher": result.teacher_perplexity, "evals": result.evals,
        "trainable_params": result.trainable_params, "mfu_formula": FORMULA,
    }, indent=2) + "\n")


def load_adapter(model: str | Path, adapter: str | Path, device: str = "cpu"):
    """A converted model with a healing adapter applied (unmerged), ready for inference.

    Use this rather than plain `PeftModel.from_pretrained`: the latentkv attention reads some
    up-projections' weights directly (GLA's kv_b_proj, GTA-S's v_up_proj), and this routes them
    through their modules (the attention's `route_projections_through_modules` hook) so their
    adapters apply.
    """
    from peft import PeftModel

    from latentkv.modeling import load_model

    base = load_model(Path(model), dtype=torch.float32, device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    adapted = {name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    tg.route_projections_through_modules(peft_model, adapted)
    return peft_model.to(device).eval()


# --- helpers ----------------------------------------------------------------------------------

def _accelerator(opts: FinetuneOptions):
    import os

    from accelerate import Accelerator

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") and \
            os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "").lower() in ("1", "true"):
        # With this on (accelerate's default), transformers loads real weights on local rank 0 only
        # and leaves the others for FSDP to broadcast at wrapping; the teacher is never wrapped, so
        # it would stay empty on every other rank (measured: PPL 2752 before training on 2 GPUs).
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        log.info("FSDP: every process loads the student and the teacher itself (cpu_ram_efficient_loading off)")
    kwargs = {"mixed_precision": "no"}  # autocast is applied by the trainer, so eval stays float32
    if opts.device == "cpu" or not torch.cuda.is_available():
        kwargs["cpu"] = True  # also what makes several CPU processes (torchrun) one data-parallel group
    return Accelerator(**kwargs)


def _autocast_dtype(opts: FinetuneOptions, device: torch.device) -> torch.dtype | None:
    if opts.precision == "fp32" or (opts.precision == "auto" and device.type != "cuda"):
        log.info("precision: float32 (%s)", "asked" if opts.precision == "fp32" else "no GPU")
        return None
    log.info("precision: bf16 autocast over float32 weights (%s)", "asked" if opts.precision == "bf16" else "GPU")
    return torch.bfloat16


def _model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise LatentKVError(f"{model} is not a model folder (no config.json); pass the output of `latentkv convert`")
    return path


def _read_config(folder: Path):
    from types import SimpleNamespace

    from latentkv.modeling import check_self_contained, read_config_json

    config = read_config_json(folder)
    check_self_contained(folder, config)
    return SimpleNamespace(**config)


def check_positions(opts: FinetuneOptions, config) -> None:
    """Training sequences and evaluation windows within the positions the model was trained for
    (a converted model's config keeps the source's limit in `source_config`)."""
    from types import SimpleNamespace

    from latentkv.calibration.runner import check_seq_len

    source = getattr(config, "source_config", None) or {}
    limit = SimpleNamespace(max_position_embeddings=getattr(config, "max_position_embeddings", None)
                            or source.get("max_position_embeddings"))
    check_seq_len(limit, opts.seq_len, "--seq-len")
    if opts.eval_windows:
        check_seq_len(limit, opts.eval_window, "--eval-window")


def _tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing tokenizer
        raise LatentKVError(f"Could not load the tokenizer of {folder} ({type(exc).__name__}); copy the source's "
                            "tokenizer files into it") from exc


def _teacher_dir(opts: FinetuneOptions, student_tok) -> Path:
    from latentkv.io.source import open_source

    source = open_source(opts.teacher, gguf_file=opts.teacher_gguf_file, trust_remote_code=opts.trust_remote_code)
    check_same_tokenizer(student_tok, source.tokenizer(), opts.teacher)
    return source.folder


def _load_teacher(folder: Path, device: torch.device):
    from latentkv.modeling import load_model

    # float32 weights: under bf16 autocast its products run in bf16 all the same, and its own
    # perplexity (the card's reference) is measured in float32 as the protocol asks.
    teacher = load_model(folder, dtype=torch.float32, device=str(device))
    teacher.requires_grad_(False)
    return teacher.eval()


def _protocol_kwargs(opts: FinetuneOptions) -> dict:
    kw = {"window": opts.eval_window, "windows": opts.eval_windows}
    if opts.eval_text:
        kw["text"] = opts.eval_text
    return kw


def _eval_windows(opts: FinetuneOptions, tokenizer) -> torch.Tensor | None:
    if opts.eval_windows == 0:
        return None
    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows

    protocol = PerplexityProtocol(**_protocol_kwargs(opts))
    log.info("evaluation: %s", protocol.describe())
    return eval_windows(tokenizer, protocol)


def _kl_windows(opts: FinetuneOptions, tokenizer) -> torch.Tensor | None:
    if opts.kl_text is None:
        return None
    from latentkv.eval.perplexity import PerplexityProtocol, eval_windows

    protocol = PerplexityProtocol(text=opts.kl_text, window=opts.kl_window, windows=opts.kl_windows)
    log.info("KL to the teacher on held-out text: %s", protocol.describe())
    return eval_windows(tokenizer, protocol)


def _resolve(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LatentKVError(f"--save-dtype must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def _log_plan(opts, plan: StepPlan, data: PackedSequences, trainer: Trainer, student, teacher) -> None:
    n_train = sum(p.numel() for p in trainer.trainable.values())
    n_all = sum(p.numel() for p in student.parameters())
    log.info(
        "%d steps of %d sequences x %d tokens (%d processes x %d micro-batches of %d), %.2f epochs of the data; "
        "training %.2fM of %.1fM parameters (%s, %s); lr %.3g (MLP x%.2g), warm-up %d steps, cosine to x%.2f; %s",
        plan.total_steps, opts.batch_size, opts.seq_len, plan.world, plan.accum, plan.micro,
        data.epochs(plan.total_steps * opts.batch_size), n_train / 1e6, n_all / 1e6, opts.mode, opts.target,
        opts.lr, opts.mlp_lr_scale, plan.warmup_steps, opts.min_lr_ratio,
        f"distilling from {opts.teacher} at T={opts.temperature}, LM weight {opts.lm_weight}, hidden-state weight "
        f"{opts.hidden_weight}" if teacher is not None
        else "LM loss only (no teacher)",
    )
    if plan.transfer_steps:
        log.info("attention transfer first: %d steps (%.3gM tokens) at lr %.3g, each attention layer toward the "
                 "teacher's output from the teacher's input; then %d KL steps", plan.transfer_steps,
                 plan.transfer_steps * plan.tokens_per_step / 1e6, opts.transfer_lr,
                 plan.total_steps - plan.transfer_steps)


@contextlib.contextmanager
def _log_file(path: Path | None):
    """Mirror latentkv's log into `<output>.log` for the duration of the run (main process)."""
    if path is None:
        yield
        return
    logger = logging.getLogger("latentkv")
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    old_level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(old_level)
