"""Optional parts of a healing run, as plug-ins on the training loop.

The loop (`latentkv.finetune.trainer.Trainer`) runs every step the same way and calls each plug-in
at fixed places; a plug-in overrides only the hooks it needs:

    setup(trainer)                 once, when the trainer is built (before a resume): check the
                                   model, build what the plug-in needs
    prepare(trainer)               once, after accelerate has wrapped the model and optimizer:
                                   refuse what this launch cannot run (FSDP)
    phase_steps, micro_step(...)   a leading phase: the first `phase_steps` optimizer steps take
                                   the plug-in's loss instead of the distillation loss
    forward_kwargs, extra_loss(...) a term added to the distillation loss of every other step
    after_step(trainer, step)      after each optimizer step (`step`: steps done)
    state_dict(), load_state_dict() what a resumed run needs, kept in the checkpoints
    finish_model(model)            on the model rebuilt with the trained weights, before it is written

At the end of a leading phase the loop restarts the optimizer's moments (the phase's loss has
gradients of another scale), closes the logged window (none mixes two losses) and starts timing
the throughput (the phase runs other work). The schedule of the learning rate is the `StepPlan`'s.

`plugins_for(opts, plan)` builds the built-in ones a `FinetuneOptions` asks for: attention
transfer (`--transfer-tokens`), latent annealing (`--anneal-rank`) and the hidden-state term
(`--hidden-weight`). More can be passed to `finetune(..., plugins=[...])`.
"""

from __future__ import annotations

import torch

from latentkv.errors import LatentKVError
from latentkv.finetune.loss import hidden_state_loss
from latentkv.finetune.options import FinetuneOptions


class TrainerPlugin:
    """One optional part of training; every hook does nothing by default.

    `trainer` is the `Trainer` running the loop: its `opts`, `plan`, `student`, `teacher`, `model`
    (the wrapped student, from `prepare` on), `acc` (the accelerator), `trainable`, `fsdp`, and its
    `autocast()` and `eager()` contexts are there for plug-ins to use.
    """

    #: the first `phase_steps` optimizer steps are this plug-in's phase (see `micro_step`); 0 = none.
    #: One plug-in of a run may have a phase. The learning rate follows the `StepPlan`, whose
    #: schedule has a phase of its own for attention transfer only.
    phase_steps: int = 0
    #: extra arguments of the student's and the teacher's forward on steps outside a phase
    forward_kwargs: dict = {}

    @property
    def name(self) -> str:
        """The key of this plug-in's state in a checkpoint."""
        return type(self).__name__

    def setup(self, trainer) -> None:
        """Once, when the trainer is built, before a checkpoint is loaded."""

    def prepare(self, trainer) -> None:
        """Once, after accelerate has wrapped the model and the optimizer (`trainer.fsdp` is known)."""

    def micro_step(self, trainer, ids: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch during the phase, in place of the distillation loss.

        The loss is divided by `trainer.plan.accum` before its backward; `last`: the step's last
        micro-batch. Returns the detached loss parts to log, "loss" included."""
        raise NotImplementedError(f"{self.name} sets phase_steps, so it must define micro_step")

    def extra_loss(self, trainer, ids: torch.Tensor, out, teacher_out) -> tuple[torch.Tensor, dict] | None:
        """A term added to the distillation loss of one micro-batch (under autocast), and its detached
        parts to log; `out` and `teacher_out` are the student's and the teacher's forward outputs
        (`teacher_out` is None without a teacher). None: nothing to add."""
        return None

    def after_step(self, trainer, step: int) -> None:
        """After optimizer step `step` (1-based: steps done), before the learning rate moves on."""

    def finish_model(self, model: torch.nn.Module) -> None:
        """On the model rebuilt on CPU with the trained weights (unmerged), before it is written; a
        change of its layers' specs (`config.attention_layers`) is written to its config."""

    def state_dict(self) -> dict:
        """What a resumed run needs to go on as if never stopped (JSON-serialisable); {}: nothing."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` from a checkpoint (called after `setup`)."""


class AttentionTransferPhase(TrainerPlugin):
    """`--transfer-tokens`: each converted attention layer trained alone toward the teacher's attention
    output, from the teacher's input to that layer (latentkv/finetune/transfer.py), for the first steps."""

    def __init__(self, steps: int):
        self.phase_steps = steps

    def setup(self, trainer) -> None:
        from latentkv.finetune.transfer import AttentionTransfer

        self.transfer = AttentionTransfer(trainer.student, trainer.teacher)

    def prepare(self, trainer) -> None:
        if trainer.fsdp:
            raise LatentKVError("--transfer-tokens calls each attention module outside the FSDP-wrapped model, which "
                                "holds only a shard of its weights; run it data parallel (no FSDP) or drop it")

    def micro_step(self, trainer, ids: torch.Tensor, last: bool) -> dict[str, torch.Tensor]:
        # The attention modules are called outside the (DDP-wrapped) model, whose gradient hooks must
        # stay idle (no_sync); the gradients are averaged over the processes here instead. Eager: the
        # teacher's attention calls are read by forward hooks, which compiled layers would not run.
        acc = trainer.acc
        with acc.no_sync(trainer.model), trainer.eager():
            with trainer.autocast():
                loss, parts = self.transfer.loss(ids)
            acc.backward(loss / trainer.plan.accum)
        parts["loss"] = loss.detach()
        if last and acc.num_processes > 1:
            for p in trainer.trainable.values():
                if p.grad is not None:
                    p.grad.copy_(acc.reduce(p.grad, "mean"))
        return parts


class LatentAnnealing(TrainerPlugin):
    """`--anneal-rank`: the MLA latent's dimensions past `rank` fade to zero over `steps` optimizer
    steps (latentkv/finetune/anneal.py); the written model drops them."""

    def __init__(self, rank: int, steps: int):
        self.rank, self.steps = rank, steps

    def setup(self, trainer) -> None:
        from latentkv.finetune.anneal import LatentAnneal

        self.anneal = LatentAnneal(trainer.student, self.rank, self.steps)

    def prepare(self, trainer) -> None:
        if trainer.fsdp:
            raise LatentKVError("--anneal-rank scales latent rows of the whole weights, which FSDP shards; run it "
                                "data parallel (no FSDP) or drop it")

    def after_step(self, trainer, step: int) -> None:
        self.anneal.after_step(step)

    def finish_model(self, model: torch.nn.Module) -> None:
        from latentkv.finetune.anneal import narrow_latent

        narrow_latent(model, self.rank)  # the faded latent dimensions are zero: dropping them changes nothing


class HiddenStateMatch(TrainerPlugin):
    """`--hidden-weight`: adds weight x the relative squared error of every layer's hidden state to
    the teacher's (`latentkv.finetune.loss.hidden_state_loss`)."""

    forward_kwargs = {"output_hidden_states": True}

    def __init__(self, weight: float):
        self.weight = weight

    def setup(self, trainer) -> None:
        check_same_residual_stream(trainer.student.config, trainer.teacher.config, trainer.opts.teacher)

    def extra_loss(self, trainer, ids: torch.Tensor, out, teacher_out) -> tuple[torch.Tensor, dict]:
        # hidden_states[0] is the embedding output, the same in both models
        hidden = hidden_state_loss(out.hidden_states[1:], teacher_out.hidden_states[1:])
        return self.weight * hidden, {"hidden": hidden.detach()}


def check_same_residual_stream(student_cfg, teacher_cfg, teacher_name: str) -> None:
    """--hidden-weight compares layer l of the student with layer l of the teacher."""
    shape = lambda c: (getattr(c, "num_hidden_layers", None), getattr(c, "hidden_size", None))  # noqa: E731
    if shape(student_cfg) != shape(teacher_cfg):
        raise LatentKVError(
            f"--hidden-weight needs a teacher with the student's layers and width; the student has "
            f"{shape(student_cfg)} (layers, hidden size), {teacher_name} has {shape(teacher_cfg)}. "
            "Pass as --teacher the model the student was converted from, or drop --hidden-weight"
        )


def plugins_for(opts: FinetuneOptions, plan) -> list[TrainerPlugin]:
    """The built-in plug-ins `opts` asks for, in the order the loop calls them; `plan`: the run's
    `StepPlan` (the transfer phase's and the fade's lengths in steps)."""
    plugins: list[TrainerPlugin] = []
    if plan.transfer_steps:
        plugins.append(AttentionTransferPhase(plan.transfer_steps))
    if opts.anneal_rank is not None:
        plugins.append(LatentAnnealing(opts.anneal_rank, plan.steps_for(opts.anneal_tokens)))
    if opts.hidden_weight > 0:
        plugins.append(HiddenStateMatch(opts.hidden_weight))
    return plugins
