"""The training loop: data parallel through `accelerate`, distillation loss, checkpoints, evaluations.

The same code runs on one process (CPU or one GPU) and under `accelerate launch` on several GPUs:
each optimizer step reads one global batch of `batch_size` sequences; process r takes every
world-th row and accumulates micro-batches, so a run's numbers do not depend on the GPU count.
Optional parts (attention transfer, latent annealing, the hidden-state term) are plug-ins that
the loop calls at fixed places (latentkv/finetune/plugins.py).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch

from latentkv.errors import LatentKVError
from latentkv.finetune import state as ckpt
from latentkv.finetune.data import PackedSequences
from latentkv.finetune.loss import distillation_loss
from latentkv.finetune.options import FinetuneOptions
from latentkv.finetune.plugins import TrainerPlugin, plugins_for
from latentkv.finetune.speed import compile_layers

log = logging.getLogger(__name__)

# Steps left out of the throughput after a (re)start: compilation and allocator warm-up.
TIMING_SKIP_STEPS = 5


@dataclass
class StepPlan:
    """How a global batch splits over processes and micro-batches, and how many steps there are.

    The first `transfer_steps` steps (if any) are the attention-transfer phase, at `transfer_lr_ratio`
    x the KL phase's learning rate; each phase has its own warm-up and cosine decay.
    """

    world: int
    per_process: int
    micro: int
    accum: int
    total_steps: int
    warmup_steps: int  # of the KL phase
    tokens_per_step: int
    transfer_steps: int = 0
    transfer_warmup_steps: int = 0
    transfer_lr_ratio: float = 1.0

    @classmethod
    def make(cls, opts: FinetuneOptions, world: int) -> "StepPlan":
        if opts.batch_size % world:
            raise LatentKVError(
                f"--batch-size {opts.batch_size} (sequences per step, all GPUs together) does not split over "
                f"{world} processes; use a multiple of {world}"
            )
        per = opts.batch_size // world
        micro = min(opts.micro_batch_size or per, per)
        if per % micro:
            raise LatentKVError(
                f"--micro-batch-size {micro} does not divide the {per} sequences each process takes per step; "
                f"use a divisor of {per}"
            )
        tokens_per_step = opts.batch_size * opts.seq_len
        total = max(1, math.ceil(opts.tokens / tokens_per_step))
        transfer = int(round(opts.transfer_tokens / tokens_per_step))
        if opts.transfer_tokens and not 0 < transfer < total:
            raise LatentKVError(
                f"--transfer-tokens {opts.transfer_tokens} makes {transfer} of the run's {total} steps of "
                f"{tokens_per_step} tokens; give it at least one step and leave at least one for the KL phase"
            )
        return cls(world, per, micro, per // micro, total, int(round(opts.warmup * (total - transfer))),
                   tokens_per_step, transfer, int(round(opts.warmup * transfer)), opts.transfer_lr / opts.lr)

    def steps_for(self, tokens: int) -> int:
        """Optimizer steps that `tokens` training tokens take (at least one)."""
        return max(1, int(round(tokens / self.tokens_per_step)))

    def in_transfer(self, step: int) -> bool:
        return step < self.transfer_steps

    def lr_factor(self, step: int, min_ratio: float) -> float:
        """Per phase: linear warm-up to 1, then cosine decay to `min_ratio` at the phase's last step."""
        if self.in_transfer(step):
            return self.transfer_lr_ratio * _warmup_cosine(step, self.transfer_steps, self.transfer_warmup_steps,
                                                           min_ratio)
        return _warmup_cosine(step - self.transfer_steps, self.total_steps - self.transfer_steps, self.warmup_steps,
                              min_ratio)


def _warmup_cosine(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class RunState:
    step: int = 0  # optimizer steps done
    evals: list[dict] = field(default_factory=list)
    before: float | None = None
    teacher_perplexity: float | None = None
    resumed_from: int | None = None
    train_seconds: float = 0.0  # in the training loop (evaluations included), all processes' starts together


def param_groups(trainable: dict[str, torch.nn.Parameter], opts: FinetuneOptions) -> list[dict]:
    """The new attention at `lr`; the MLP (source weights, or LoRA on them) at `lr x mlp_lr_scale`."""
    mlp = [p for n, p in trainable.items() if ".mlp." in n]
    rest = [p for n, p in trainable.items() if ".mlp." not in n]
    groups = [{"params": rest, "lr": opts.lr}]
    if mlp:
        groups.append({"params": mlp, "lr": opts.lr * opts.mlp_lr_scale})
    return [g for g in groups if g["params"]]


class Trainer:
    """The loop: `plugins` (None: the built-in ones `opts` asks for, `plugins_for`) are called at
    the hooks of `TrainerPlugin`."""

    def __init__(self, opts: FinetuneOptions, accelerator, student, teacher, data: PackedSequences,
                 plan: StepPlan, autocast_dtype: torch.dtype | None, eval_windows: torch.Tensor | None,
                 progress=None, kl_windows: torch.Tensor | None = None, started: float | None = None,
                 plugins: list[TrainerPlugin] | None = None):
        self.opts, self.acc, self.plan, self.data = opts, accelerator, plan, data
        self.student = student  # the module itself (eval, state); self.model is what trains
        self.teacher = teacher
        self.autocast_dtype = autocast_dtype
        self.eval_windows = eval_windows
        self.kl_windows = kl_windows  # held-out text for KL(teacher || student) at every evaluation
        self.started = time.perf_counter() if started is None else started  # --stop-after-seconds counts from here
        self.flops_per_token: float | None = None  # set by the caller: MFU in the evaluation records
        self.peak_flops: float | None = None  # all processes together
        self.eval_seconds = self.checkpoint_seconds = 0.0  # the last ones' durations, for the time-based stop
        self.progress = progress if accelerator.is_main_process else None
        self.trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if not self.trainable:
            raise LatentKVError("Nothing to train: no parameter requires a gradient")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.trainable, opts), betas=(0.9, 0.95), eps=1e-8, weight_decay=opts.weight_decay
        )
        self.plugins = plugins_for(opts, plan) if plugins is None else list(plugins)
        phases = [p for p in self.plugins if p.phase_steps]
        if len(phases) > 1:
            raise LatentKVError(f"plug-ins {', '.join(p.name for p in phases)} each ask for a leading phase; the loop "
                                "runs one: drop all but one of them")
        self.phase = phases[0] if phases else None  # steps [0, phase_steps) take its loss
        self.phase_steps = self.phase.phase_steps if self.phase else 0
        self.forward_kwargs = {k: v for p in self.plugins for k, v in p.forward_kwargs.items()}
        for plugin in self.plugins:
            plugin.setup(self)
        self.state = RunState()
        self.timed_tokens = self.all_tokens = 0
        self.timed_seconds = self.all_seconds = 0.0

    # --- set-up -------------------------------------------------------------------------------
    def resume_if_possible(self) -> None:
        """Load the newest complete checkpoint of a run with the same settings (before `prepare`)."""
        path = ckpt.latest_checkpoint(self.opts.checkpoint_dir)
        if path is None:
            return
        saved = ckpt.check_resumable(path, self.opts.resume_key())
        tensors = ckpt.read_trainable(path)
        missing = sorted(set(self.trainable) - set(tensors))
        if missing:
            raise LatentKVError(f"{path} lacks trained tensors ({', '.join(missing[:3])}, ...); delete it to start over")
        with torch.no_grad():
            for name, p in self.trainable.items():
                p.copy_(tensors[name].to(p.device, p.dtype))
        self._optimizer_state = ckpt.read_optimizer(path, self.acc.process_index, self.acc.num_processes,
                                                    saved.get("world", 1))
        self._scheduler_state = saved["scheduler"]
        ckpt.set_rng_state(saved["rng"])
        plugin_states = saved.get("plugins", {})
        for plugin in self.plugins:
            if plugin.name in plugin_states:
                plugin.load_state_dict(plugin_states[plugin.name])
        self.state = RunState(step=saved["step"], evals=saved.get("evals", []), before=saved.get("before"),
                              teacher_perplexity=saved.get("teacher_perplexity"), resumed_from=saved["step"],
                              train_seconds=saved.get("train_seconds", 0.0))
        if saved["data_position"] != saved["step"] * self.opts.batch_size:
            raise LatentKVError(f"{path} has an inconsistent data position; delete it to start over")
        log.info("resuming from %s: step %d of %d, %d tokens done", path, saved["step"], self.plan.total_steps,
                 saved["tokens"])

    def prepare(self) -> None:
        acc = self.acc
        self.model, self.optimizer = acc.prepare(self.student, self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: self.plan.lr_factor(s, self.opts.min_lr_ratio)
        )
        if getattr(self, "_optimizer_state", None) is not None:
            self.optimizer.load_state_dict(self._optimizer_state)
            self.scheduler.load_state_dict(self._scheduler_state)
            self._optimizer_state = None
        self.fsdp = "FSDP" in str(acc.distributed_type)
        for plugin in self.plugins:
            plugin.prepare(self)
        self.eval_model = self.model if self.fsdp else self.student
        self.loss_fn = distillation_loss
        if self.opts.compile:
            # Regional compilation: every decoder layer has the same code, so one compilation serves
            # all of them (tens of seconds, not minutes); the loss fuses its softmaxes over the vocabulary.
            n = compile_layers(self.student) + (compile_layers(self.teacher) if self.teacher is not None else 0)
            self.loss_fn = torch.compile(distillation_loss, dynamic=False)
            log.info("compiling %d decoder layers and the loss with torch.compile", n)

    # --- pieces of a step ---------------------------------------------------------------------
    def autocast(self):
        """The training forward's autocast (none in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.acc.device.type, dtype=self.autocast_dtype)

    @staticmethod
    def eager():
        """Compiled layers run eagerly inside (forward hooks, other shapes)."""
        return _eager()

    def _local_rows(self, step: int) -> torch.Tensor:
        batch = self.data.batch(step * self.opts.batch_size, self.opts.batch_size)  # [B, seq]
        return batch[self.acc.process_index :: self.plan.world]

    def _micro_step(self, ids: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
        """The distillation loss of one micro-batch, the plug-ins' terms added, and its backward."""
        ctx = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
        with ctx:
            with self.autocast():
                teacher_out = None
                if self.teacher is not None:
                    with torch.no_grad():
                        teacher_out = self.teacher(input_ids=ids, use_cache=False, **self.forward_kwargs)
                out = self.model(input_ids=ids, use_cache=False, **self.forward_kwargs)
                loss, parts = self.loss_fn(out.logits, teacher_out.logits if teacher_out is not None else None, ids,
                                           self.opts.temperature, self.opts.lm_weight)
                for plugin in self.plugins:
                    extra = plugin.extra_loss(self, ids, out, teacher_out)
                    if extra is not None:
                        loss = loss + extra[0]
                        parts.update(extra[1])
            self.acc.backward(loss / self.plan.accum)
        parts["loss"] = loss.detach()
        return parts

    def _step(self, step: int) -> dict[str, torch.Tensor]:
        rows = self._local_rows(step).to(self.acc.device)
        if step == self.phase_steps > 0:
            # The steps after a phase start from fresh moments: its loss's gradients have another scale.
            _inner(self.optimizer).state.clear()
        phase = self.phase if step < self.phase_steps else None
        sums: dict[str, torch.Tensor] = {}
        for k in range(self.plan.accum):
            ids = rows[k * self.plan.micro : (k + 1) * self.plan.micro]
            last = k == self.plan.accum - 1
            parts = phase.micro_step(self, ids, last) if phase is not None else self._micro_step(ids, last)
            for name, value in parts.items():
                sums[name] = sums.get(name, 0) + value / self.plan.accum
        if self.opts.max_grad_norm > 0:
            sums["grad_norm"] = self.acc.clip_grad_norm_(list(self.trainable.values()), self.opts.max_grad_norm)
        self.optimizer.step()
        for plugin in self.plugins:
            plugin.after_step(self, step + 1)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return sums

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> RunState:
        opts, plan, st = self.opts, self.plan, self.state
        stop_at = plan.total_steps
        if opts.stop_after_steps is not None:
            stop_at = min(stop_at, st.step + opts.stop_after_steps)
        pending = [t for t in opts.eval_at if t > st.step * plan.tokens_per_step]
        first = st.step
        deadline = self.started + opts.stop_after_seconds if opts.stop_after_seconds else None
        loop_start, seconds_before = time.perf_counter(), st.train_seconds
        window: dict[str, torch.Tensor] = {}
        window_steps = 0
        self.model.train()
        self._sync()
        mark, mark_step = time.perf_counter(), st.step
        if self.progress:
            self.progress("start", {"step": st.step, "steps": plan.total_steps, "tokens": st.step * plan.tokens_per_step,
                                    "tokens_total": plan.total_steps * plan.tokens_per_step})
        while st.step < stop_at:
            step_start = time.perf_counter()
            parts = self._step(st.step)
            st.step += 1
            if deadline is not None and st.step < stop_at and self._out_of_time(step_start, deadline, pending):
                stop_at = st.step
                log.info("stopping at step %d: the next step would not end within --stop-after-seconds %g",
                         st.step, opts.stop_after_seconds)
            window_steps += 1
            for k, v in parts.items():
                window[k] = window.get(k, 0) + (v.detach().float() if torch.is_tensor(v) else v)
            tokens = st.step * plan.tokens_per_step
            due_eval = bool(pending) and tokens >= pending[0]
            due_ckpt = (opts.checkpoint_every and st.step % opts.checkpoint_every == 0 and st.step < plan.total_steps)
            last = st.step == stop_at
            st.train_seconds = seconds_before + time.perf_counter() - loop_start
            phase_end = st.step == self.phase_steps > 0  # so no logged window mixes two losses
            if st.step % opts.log_every == 0 or due_eval or due_ckpt or last or phase_end:
                now = self._sync()
                seconds = now - mark
                self.all_seconds += seconds
                self.all_tokens += (st.step - mark_step) * plan.tokens_per_step
                # the steps after a phase alone are timed (a phase runs other work)
                if mark_step - max(first, self.phase_steps) >= min(TIMING_SKIP_STEPS, opts.log_every):
                    self.timed_seconds += seconds
                    self.timed_tokens += (st.step - mark_step) * plan.tokens_per_step
                metrics = {k: float(self.acc.reduce(torch.as_tensor(v, device=self.acc.device).float(), "mean"))
                           / window_steps for k, v in window.items()}
                metrics.update(step=st.step, steps=plan.total_steps, tokens=tokens,
                               lr=self.scheduler.get_last_lr()[0],
                               tokens_per_s=(st.step - mark_step) * plan.tokens_per_step / max(seconds, 1e-9))
                log.info("step %d/%d  tokens %.3gM  loss %.4f%s  lr %.3g  %.0f tokens/s", st.step, plan.total_steps,
                         tokens / 1e6, metrics.get("loss", float("nan")),
                         "".join(f"  {k} {metrics[k]:.4f}" for k in window if k not in ("loss", "grad_norm")),
                         metrics["lr"], metrics["tokens_per_s"])
                if self.progress:
                    self.progress("step", metrics)
                window, window_steps = {}, 0
                if due_eval:
                    while pending and tokens >= pending[0]:
                        pending.pop(0)
                    record = self.evaluation_record(tokens)
                    st.evals.append(record)
                    log.info("eval at %.3gM tokens: perplexity %.4g%s", tokens / 1e6, record["perplexity"],
                             f", KL to the teacher {record['kl']:.4g}" if "kl" in record else "")
                    if self.progress:
                        self.progress("eval", record)
                if due_ckpt or (last and st.step < plan.total_steps):
                    t_ckpt = time.perf_counter()
                    st.train_seconds = seconds_before + t_ckpt - loop_start
                    self.save_checkpoint()
                    self.checkpoint_seconds = time.perf_counter() - t_ckpt
                mark, mark_step = self._sync(), st.step
        return st

    def _out_of_time(self, step_start: float, deadline: float, pending: list[int]) -> bool:
        """Whether another step (with the evaluation it may bring) and a checkpoint would pass the
        deadline; the processes agree (any one out of time stops all)."""
        now = self._sync()
        need = now - step_start + self.checkpoint_seconds
        if pending and (self.state.step + 1) * self.plan.tokens_per_step >= pending[0]:
            need += self.eval_seconds
        late = torch.tensor(float(now + need > deadline), device=self.acc.device)
        return float(self.acc.reduce(late, "sum")) > 0

    def evaluation_record(self, tokens: int, model=None) -> dict:
        """One evaluation point: perplexity, KL to the teacher on the held-out text (if any), and the
        throughput and training time that reached it."""
        t0 = time.perf_counter()
        record = {"tokens": tokens, "perplexity": self.evaluate(model)}
        if self.kl_windows is not None and self.teacher is not None:
            record["kl"] = self.kl_to_teacher(model)
        tps = self.tokens_per_s if tokens else None
        record["tokens_per_s"] = tps if tps == tps else None
        record["mfu"] = (tps * self.flops_per_token / self.peak_flops
                         if record["tokens_per_s"] and self.flops_per_token and self.peak_flops else None)
        record["train_seconds"] = self.state.train_seconds
        self.eval_seconds = time.perf_counter() - t0
        return record

    def _sync(self) -> float:
        if self.acc.device.type == "cuda":
            torch.cuda.synchronize(self.acc.device)
        return time.perf_counter()

    @property
    def tokens_per_s(self) -> float:
        """Steady state; a run too short to leave out its warm-up steps counts them all."""
        if self.timed_seconds > 0:
            return self.timed_tokens / self.timed_seconds
        return self.all_tokens / self.all_seconds if self.all_seconds > 0 else float("nan")

    # --- evaluation and checkpoints ------------------------------------------------------------
    def evaluate(self, model=None) -> float | None:
        """Perplexity on the evaluation windows (float32, no autocast), split over the processes."""
        if self.eval_windows is None:
            return None
        from latentkv.eval.perplexity import perplexity

        model = model if model is not None else self.eval_model
        was_training = model.training
        model.eval()
        mine = self.eval_windows[self.acc.process_index :: self.acc.num_processes]
        local = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        if mine.shape[0]:
            n = mine.shape[0] * (mine.shape[1] - 1)
            with _eager():  # compiled layers would recompile for the evaluation's shapes
                local[0] = math.log(perplexity(model, mine, batch_size=4)) * n
            local[1] = n
        total = self.acc.reduce(local, "sum")
        model.train(was_training)
        return math.exp(float(total[0] / total[1]))

    def kl_to_teacher(self, model=None) -> float:
        """Mean KL(teacher || student) in nats per token on the held-out windows, split over the processes."""
        from latentkv.eval.agreement import agreement

        model = model if model is not None else self.eval_model
        was_training = model.training
        model.eval()
        mine = self.kl_windows[self.acc.process_index :: self.acc.num_processes]
        local = torch.zeros(2, dtype=torch.float64, device=self.acc.device)
        if mine.shape[0]:
            with _eager():
                r = agreement(model, self.teacher, mine, batch_size=4)
            local[0], local[1] = r["kl_to_source"] * r["tokens"], r["tokens"]
        total = self.acc.reduce(local, "sum")
        model.train(was_training)
        return float(total[0] / total[1])

    def trained_tensors(self) -> dict[str, torch.Tensor]:
        if self.fsdp:
            full = self.acc.get_state_dict(self.model)
            return {k: full[k] for k in self.trainable if k in full}
        return {k: p.detach() for k, p in self.trainable.items()}

    def save_checkpoint(self) -> None:
        acc, st = self.acc, self.state
        root = self.opts.checkpoint_dir
        tmp = root / f".step-{st.step:07d}.partial"
        if acc.is_main_process:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        tensors = self.trained_tensors()
        ckpt.write_optimizer(tmp, acc.process_index, self.optimizer.state_dict())
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_trainable(tmp, tensors)
            state = {
                "step": st.step, "tokens": st.step * self.plan.tokens_per_step,
                "data_position": st.step * self.opts.batch_size, "total_steps": self.plan.total_steps,
                "world": acc.num_processes, "scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(),
                "evals": st.evals, "before": st.before, "teacher_perplexity": st.teacher_perplexity,
                "train_seconds": st.train_seconds,
                "resume_key": self.opts.resume_key(),
            }
            plugin_states = {p.name: p.state_dict() for p in self.plugins}
            if any(plugin_states.values()):
                state["plugins"] = {k: v for k, v in plugin_states.items() if v}
            ckpt.finish(tmp, st.step, state, self.opts.keep_checkpoints)
        acc.wait_for_everyone()


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _eager():
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()
