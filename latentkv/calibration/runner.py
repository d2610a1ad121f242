"""Run a source model one decoder layer at a time from lazily read weights.

Only one layer's weights and the current activations are in memory: the model skeleton lives on
the `meta` device, each layer is materialised with `to_empty` and filled from the checkpoint,
run over every calibration window, and dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
from collections.abc import Iterator

import torch
from torch import nn

from latentkv.arch import get_arch
from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_MMAP_CEILING = 32 << 20  # glibc's adaptive mmap threshold never rises above this (64-bit)


@contextlib.contextmanager
def freed_memory_held(limit: int = 256 << 20) -> Iterator[None]:
    """Within the block, let the C library keep up to `limit` bytes of freed heap for reuse.

    Each batch of a layer pass frees and reallocates the same ~100 MB of temporaries. glibc hands
    freed memory back to the OS once a little of it sits free at the top of the heap, and the next
    batch faults it in again, zeroed: millions of page faults, seconds of system time. Blocks over
    32 MB stay memory-mapped and still return at once. On leaving, the trim threshold goes back to
    what glibc's own adaptive rule settles at and the held memory is handed back. A no-op outside glibc.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_CEILING)  # also fixes the threshold glibc would adapt
        mallopt(_M_TRIM_THRESHOLD, limit)
    try:
        yield
    finally:
        if mallopt is not None:
            mallopt(_M_TRIM_THRESHOLD, 2 * _MMAP_CEILING)
        release_freed_memory()


def release_freed_memory() -> None:
    """Give the pages of freed tensors back to the OS now.

    glibc keeps freed heap memory for reuse; after a phase with many large temporaries (batched
    tokenization, a calibration pass) that can be hundreds of MB of resident memory that later
    steps never reuse. A no-op where the C library has no `malloc_trim`.
    """
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def _libc_function(name: str):
    try:
        return getattr(ctypes.CDLL(None), name, None)  # the process's own C library
    except (OSError, TypeError):  # no dlopen(NULL) on this platform
        return None


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
    if dtype not in table:
        raise LatentKVError(f"Unknown dtype {dtype!r}; use one of {', '.join(sorted(table))}")
    return table[dtype]




def peak_memory_bytes() -> int | None:
    """This process's peak resident memory so far (None where the OS does not say)."""
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS counts bytes, Linux KiB


def resident_memory_bytes() -> int | None:
    """This process's resident memory now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class MemoryTrace:
    """Which stage of a run its peak resident memory was reached in.

    `mark(stage)` is called as each stage ends; the peak so far is read then, so a peak that rose
    since the last mark was reached within `stage`. Each mark is logged (shown with -v) with the
    memory resident at that point."""

    def __init__(self) -> None:
        self.peak = peak_memory_bytes() or 0
        self.peak_stage: str | None = None  # None: the peak predates the first stage
        self.marks: list[tuple[str, int | None, int | None]] = []  # (stage, resident after it, peak so far)

    def mark(self, stage: str) -> None:
        peak, now = peak_memory_bytes(), resident_memory_bytes()
        self.marks.append((stage, now, peak))
        if peak is None:
            return
        if peak > self.peak:
            self.peak, self.peak_stage = peak, stage
        log.info("memory after %s: %s MB resident, peak so far %.0f MB", stage,
                 "?" if now is None else f"{now / 1e6:.0f}", peak / 1e6)

    def where(self) -> str:
        """When the peak was reached, for a note: 'while STAGE' or 'before the first stage'."""
        return "before the first stage" if self.peak_stage is None else f"while {self.peak_stage}"


def check_device(device: str | torch.device) -> torch.device:
    """The device a user named, refused at once if this machine does not have it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise LatentKVError(f"Unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LatentKVError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is False); "
                                "use --device cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LatentKVError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise LatentKVError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise LatentKVError(f"--device {device}: use cpu, cuda or cuda:N")
    return dev


def check_seq_len(config, seq_len: int, flag: str) -> None:
    """Refuse windows longer than the positions the model was trained for (its config says how many)."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and seq_len > limit:
        raise LatentKVError(f"{flag} {seq_len} is beyond the model's max_position_embeddings ({limit}); "
                            f"use {flag} {limit} or less")


def check_finite(t: torch.Tensor, name: str, folder) -> None:
    """Refuse a weight holding NaN or Inf: every statistic and fit downstream would be garbage."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise LatentKVError(f"Weight {name} in {folder} holds NaN or Inf values; the checkpoint is corrupt: "
                            "re-download or re-export it")


class LayerStream:
    """Source model as a sequence of decoder layers materialised one at a time."""

    def __init__(self, config, weights, *, device: str = "cpu", dtype: str | torch.dtype = "float32", batch_size: int = 8):
        from transformers import AutoModelForCausalLM

        self.config = config
        self.weights = weights
        self.arch = get_arch(config)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size
        # SDPA unless the architecture needs transformers' eager attention (soft-capped scores)
        config._attn_implementation = self.arch.attention_implementation(config)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
        # Rotary buffers are computed at construction: build this one for real.
        self.decoder = getattr(self.skeleton, self.arch.base_model)  # `model`, `gpt_neox`: holds the layers
        self.rotary = type(self.decoder.rotary_emb)(config=config).to(self.device)
        self.num_layers = config.num_hidden_layers
        self.check_checkpoint()

    def layer_attention(self, i: int):
        """Layer i's own attention facts (RoPE or none, sliding window, layer type)."""
        return self.arch.layer_attention(self.config, i)

    def _rotary_attr(self, i: int, name: str, default=None):
        # Gemma 3 keeps one table per layer type (`{type}_inv_freq`), the others one for all layers
        layer_type = self.layer_attention(i).layer_type if self.arch.rope_per_layer_type else None
        return getattr(self.rotary, f"{layer_type}_{name}" if layer_type else name, default)

    def inv_freq_of(self, i: int) -> torch.Tensor:
        """RoPE frequencies of layer i's key pairs (none for a layer without RoPE)."""
        if not self.layer_attention(i).rope:
            return torch.zeros(0, dtype=torch.float64)
        return self._rotary_attr(i, "inv_freq").detach().double().cpu()

    def attention_scaling_of(self, i: int) -> float:
        return float(self._rotary_attr(i, "attention_scaling", 1.0))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weights.get(self.arch.embed, dtype=self.dtype, device=self.device)
        check_finite(table, self.arch.embed, self.weights.folder)
        return nn.functional.embedding(ids.to(self.device), table)

    def position_embeddings(self, seq_len: int, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) that the decoder hands layer `layer` for positions 0 .. seq_len - 1."""
        pos = torch.arange(seq_len, device=self.device)[None]
        dummy = torch.empty(1, seq_len, 1, device=self.device, dtype=self.dtype)
        if self.arch.rope_per_layer_type:
            return self.rotary(dummy, pos, self.layer_attention(layer).layer_type)
        return self.rotary(dummy, pos)

    def attention_mask(self, layer: int, seq_len: int) -> torch.Tensor | None:
        """The causal mask layer `layer` needs over windows of seq_len tokens, None where SDPA's own
        causal mask is exact: an additive [1, 1, L, L] mask for eager attention (which applies no
        mask of its own) and for a sliding-window layer whose window is shorter than the windows."""
        window = self.layer_attention(layer).sliding_window
        clipped = window is not None and window < seq_len
        if self.config._attn_implementation == "sdpa" and not clipped:
            return None
        t = torch.arange(seq_len, device=self.device)
        seen = t[None, :] <= t[:, None]
        if clipped:
            seen &= t[None, :] > t[:, None] - window
        mask = torch.zeros(seq_len, seq_len, device=self.device, dtype=self.dtype)
        return mask.masked_fill(~seen, torch.finfo(self.dtype).min)[None, None]

    def _layer_plan(self, i: int) -> dict[str, list[list[str]]]:
        """Layer i's tensors under transformers' module names (relative to the layer) -> the disk
        tensors each is made of: [[name]] for a plain one, one list per expert for an expert stack
        (each expert's parts concatenated, then the experts stacked)."""
        prefix = self.arch.layer_key(i)
        disk = {k[len(prefix):]: k for k in self.weights.keys() if k.startswith(prefix)}
        plan: dict[str, list[list[str]]] = {}
        consumed: set[str] = set()
        for module_name, patterns in self.arch.expert_stacks:
            num_experts = getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", 0)
            if not all(p.format(e=0) in disk for p in patterns):
                continue
            experts = []
            for e in range(num_experts):
                names = [p.format(e=e) for p in patterns]
                absent = [n for n in names if n not in disk]
                if absent:
                    raise LatentKVError(f"The checkpoint lacks {prefix}{absent[0]} (expert {e} of {num_experts} that "
                                        "config.json declares); re-download the checkpoint or fix config.json")
                consumed.update(names)
                experts.append([disk[n] for n in names])
            plan[module_name] = experts
        for rel, full in disk.items():
            if rel in consumed:
                continue
            name = rel
            for old, new in self.arch.disk_renames:
                name = name.replace(old, new)
            plan[name] = [[full]]
        return plan

    def layer_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Tensors of layer i under transformers' in-memory module names (relative to the layer)."""
        out: dict[str, torch.Tensor] = {}
        for name, experts in self._layer_plan(i).items():
            got = [[self.weights.get(n, dtype=self.dtype, device=self.device) for n in parts] for parts in experts]
            joined = [torch.cat(parts, dim=0) if len(parts) > 1 else parts[0] for parts in got]
            is_stack = len(experts) > 1 or len(experts[0]) > 1 or name in dict(self.arch.expert_stacks)
            out[name] = torch.stack(joined) if is_stack else joined[0]
        return out

    def check_checkpoint(self) -> None:
        """Every tensor config.json implies is present with its shape, from the headers alone (no
        weights read), so a bad checkpoint is refused at once rather than when its layer is reached."""
        w, arch = self.weights, self.arch
        hidden, vocab = self.config.hidden_size, self.config.vocab_size
        for name in (arch.embed, arch.final_norm):
            if name not in w:
                raise LatentKVError(f"The checkpoint in {w.folder} lacks {name!r}; re-download it, or check that its "
                                    "config.json (model_type) belongs to these weights")
        if tuple(w.shape(arch.embed)) != (vocab, hidden):
            raise LatentKVError(f"{arch.embed} in {w.folder} has shape {tuple(w.shape(arch.embed))} but config.json "
                                f"says vocab_size {vocab} x hidden_size {hidden}; the config does not belong to these weights")
        for i in range(self.num_layers):
            expected = {k: tuple(v.shape) for k, v in self.decoder.layers[i].state_dict().items()
                        if not k.endswith("inv_freq")}
            found: dict[str, tuple[int, ...]] = {}
            for name, experts in self._layer_plan(i).items():
                shapes = [[tuple(w.shape(n)) for n in parts] for parts in experts]
                one = [(sum(s[0] for s in parts),) + parts[0][1:] if len(parts) > 1 else parts[0] for parts in shapes]
                is_stack = len(experts) > 1 or len(experts[0]) > 1 or name in dict(arch.expert_stacks)
                found[name] = (len(one),) + one[0] if is_stack else one[0]
            missing = sorted(set(expected) - set(found))
            if missing:
                raise LatentKVError(
                    f"The checkpoint in {w.folder} lacks layer {i}'s {', '.join(missing[:3])}"
                    f"{' ...' if len(missing) > 3 else ''} that config.json implies; re-download it, or check that "
                    "config.json belongs to these weights")
            for name, shape in expected.items():
                if found[name] != shape:
                    raise LatentKVError(
                        f"Layer {i}'s {name} in {w.folder} has shape {found[name]} but config.json implies {shape} "
                        "(hidden_size, heads, num_key_value_heads, head_dim, intermediate_size); the config does not "
                        "belong to these weights: fix config.json or re-download the checkpoint")

    def load_layer(self, i: int) -> nn.Module:
        layer = self.decoder.layers[i]
        layer = layer.to_empty(device=self.device)
        state = self.layer_state_dict(i)
        for name, t in state.items():
            check_finite(t, f"{self.arch.layer_key(i)}{name}", self.weights.folder)
        missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not m.endswith("inv_freq")]
        if missing or unexpected:
            raise LatentKVError(
                f"Layer {i} of the checkpoint does not match transformers' {type(layer).__name__}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}. The checkpoint may be from another "
                "architecture or transformers version."
            )
        layer.eval()
        return layer

    def release_layer(self, i: int) -> None:
        # Back to meta so the weights are freed.
        self.decoder.layers[i] = self.decoder.layers[i].to("meta")

    @torch.no_grad()
    def run(self, layer: nn.Module, hidden: torch.Tensor, pos_emb, observe=None, mask=None) -> torch.Tensor:
        """Apply a decoder layer to every window, in batches, in place.

        `observe(x, first)`, if given, sees the attention input x (the input norm's output, or the
        layer input where there is no input norm) of the windows from `first` on during the same
        pass, so statistics cost no second pass.
        """
        first = 0
        hook = None
        if observe is not None:
            attention = layer.get_submodule(self.arch.attention)

            def seen(_module, args, kwargs):  # reads `first` when called: the batch now running
                observe(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], first)

            hook = attention.register_forward_pre_hook(seen, with_kwargs=True)
        try:
            for first, chunk in self.batches(hidden):
                out = layer(chunk, attention_mask=mask, position_embeddings=pos_emb)
                hidden[first : first + chunk.shape[0]] = out[0] if isinstance(out, tuple) else out
        finally:
            if hook is not None:
                hook.remove()
        return hidden

    def batches(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        """(index of the first window, windows) per batch."""
        for first in range(0, hidden.shape[0], self.batch_size):
            yield first, hidden[first : first + self.batch_size]
