"""Attention transfer: the first phase of a healing run, each converted attention layer trained alone.

End-to-end distillation moves every layer at once from one number per token (the KL of the
output), and a layer's errors reach the next layer's input. Attention transfer (LoLCATs, Zhang et
al. 2024, arXiv 2410.10254) first trains each new attention module on its own: it reads the
*teacher's* input to that layer and is asked for the *teacher's* attention output there,

    loss = mean_l ||A'_l(x_l) - A_l(x_l)||^2 / ||A_l(x_l)||^2,   x_l = the teacher's input to attention l,

so all layers learn side by side from one teacher forward, with a target of hidden-size numbers
per token and layer, and none waits for the layers below it to heal. The one-shot fit (and the
output refit) are closed-form approximations of the same objective on second moments; this phase
optimises it through the softmax, with every attention weight free. The end-to-end KL phase
follows on the rest of the token budget.

The teacher's per-layer inputs and outputs are read by forward hooks on its attention modules, so
any decoder layer code (Llama, GPT-NeoX's parallel residual, Gemma's extra norms) is handled: the
student's attention is called with exactly the arguments the teacher's received.
"""

from __future__ import annotations

import torch

from latentkv.errors import LatentKVError
from latentkv.finetune.loss import hidden_state_loss


def attention_modules(model: torch.nn.Module, base_model: str, attention: str) -> list[torch.nn.Module]:
    """Each decoder layer's attention module, found under the source architecture's names."""
    base = getattr(model, base_model, None)
    if base is None and hasattr(model, "get_base_model"):  # a peft wrapper
        base = getattr(model.get_base_model(), base_model, None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise LatentKVError(f"{type(model).__name__} has no {base_model}.layers; attention transfer needs a decoder "
                            "with the teacher's layer layout (drop --transfer-tokens)")
    missing = [i for i, layer in enumerate(layers) if not hasattr(layer, attention)]
    if missing:
        raise LatentKVError(f"decoder layers {missing[:3]} of {type(model).__name__} have no `{attention}` module; "
                            "attention transfer needs the teacher's layer layout (drop --transfer-tokens)")
    return [getattr(layer, attention) for layer in layers]


class AttentionTransfer:
    """The attention-transfer loss of a student (converted) against its teacher (the source)."""

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module):
        from latentkv.arch.tables import get_arch

        names = get_arch(teacher.config).module_names()
        self.teacher = teacher
        self.teacher_base = getattr(teacher, names["base_model"])
        self.teacher_attention = attention_modules(teacher, names["base_model"], names["attention"])
        self.student_attention = attention_modules(student, names["base_model"], names["attention"])
        if len(self.student_attention) != len(self.teacher_attention):
            raise LatentKVError(
                f"attention transfer pairs layer l of the student with layer l of the teacher; the student has "
                f"{len(self.student_attention)} layers, the teacher {len(self.teacher_attention)}. Pass as --teacher "
                "the model the student was converted from, or drop --transfer-tokens"
            )

    def _teacher_calls(self, input_ids: torch.Tensor) -> list[tuple[tuple, dict, torch.Tensor]]:
        """(args, kwargs, output) of every teacher attention call in one forward of its decoder."""
        calls: list = [None] * len(self.teacher_attention)

        def hook(index, module, args, kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            calls[index] = (args, kwargs, out)

        handles = [m.register_forward_hook(lambda mod, a, kw, out, i=i: hook(i, mod, a, kw, out), with_kwargs=True)
                   for i, m in enumerate(self.teacher_attention)]
        try:
            with torch.no_grad():
                self.teacher_base(input_ids=input_ids, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return calls

    def loss(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The mean relative squared error of the student's attention outputs to the teacher's."""
        outputs, targets = [], []
        for student, (args, kwargs, target) in zip(self.student_attention, self._teacher_calls(input_ids), strict=True):
            out = student(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
            targets.append(target)
        loss = hidden_state_loss(tuple(outputs), tuple(targets))
        return loss, {"transfer": loss.detach()}
