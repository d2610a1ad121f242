"""Per-layer calibration statistics, accumulated in float64, cached on disk with a fingerprint.

For each decoder layer we keep:
- `moment`: E[x_aug x_aug^T] with x_aug = [x; 1], x the attention input (after the input norm).
  The appended 1 makes every bias an ordinary column, so biased projections need no special case.
- `distance`: per query head, the mean attention mass at each query-key distance (from a few
  windows), which says how far RoPE rotates the pairs that the head really compares.

Where the keys are not linear in x (a per-head norm on q and k before RoPE, Qwen3), the converted
attention reads the source's normalised keys and values y = [k_norm(k(x)); v(x)] instead of x, and the
queries after their norm: `moment` is then E[y_aug y_aug^T] and `q_moment` E[q_aug q_aug^T] of the
normalised queries (the same accumulator, the same float64 sums).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from latentkv.errors import LatentKVError

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    moment: torch.Tensor  # [D+1, D+1] float64
    tokens: int
    distance: torch.Tensor | None = None  # [H, L] float64, rows sum to 1
    samples: torch.Tensor | None = None  # [n, D] a strided subset of attention inputs (for non-linear fits)
    q_moment: torch.Tensor | None = None  # [H*d+1, H*d+1] float64, normalised queries (QK-norm sources only)

    def check(self, layer: int) -> None:
        if not all(torch.isfinite(m).all() for m in (self.moment, self.q_moment) if m is not None):
            raise LatentKVError(
                f"Calibration statistics of layer {layer} contain NaN/Inf: the model overflows in this dtype "
                "on this text. Use --dtype float32, or check the checkpoint for corrupt weights."
            )

    def to_dict(self) -> dict:
        out = {"moment": self.moment, "tokens": torch.tensor(self.tokens)}
        if self.distance is not None:
            out["distance"] = self.distance
        if self.samples is not None:
            out["samples"] = self.samples
        if self.q_moment is not None:
            out["q_moment"] = self.q_moment
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "LayerStats":
        return cls(moment=d["moment"], tokens=int(d["tokens"]), distance=d.get("distance"), samples=d.get("samples"),
                   q_moment=d.get("q_moment"))


class MomentAccumulator:
    """Sum of x_aug x_aug^T over tokens; per batch in float32 products, summed in float64."""

    def __init__(self, dim: int, device):
        self.sum = torch.zeros(dim + 1, dim + 1, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        # Each batch's products and column sums in float32 (fast), the running sum in float64 (no
        # drift over many batches); the in-place adds promote without a float64 copy of the batch.
        flat = x.reshape(-1, x.shape[-1]).float()  # [tokens, D]
        n = flat.shape[0]
        self.sum[:-1, :-1] += flat.T @ flat
        col = flat.sum(0)
        self.sum[:-1, -1] += col
        self.sum[-1, :-1] += col
        self.sum[-1, -1] += n
        self.tokens += n

    def result(self) -> torch.Tensor:
        return (self.sum / max(self.tokens, 1)).cpu()


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@torch.no_grad()
def attention_distance_profile(q: torch.Tensor, k: torch.Tensor, scale: float, softcap: float | None = None) -> torch.Tensor:
    """Mean attention mass per distance for each query head: [H, L].

    q: [b, H, L, d], k: [b, G, L, d], both after RoPE; softcap: tanh cap of the scores (Gemma 2).
    """
    b, H, L, _ = q.shape
    G = k.shape[1]
    k = k.repeat_interleave(H // G, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~causal, float("-inf"))
    mass = scores.softmax(-1).sum(0).double()  # [H, L, L]: summed over the b windows in float32
    t = torch.arange(L, device=q.device)
    dist = (t[:, None] - t[None, :]).clamp(min=0)  # [L, L]
    profile = torch.zeros(H, L, dtype=torch.float64, device=q.device)
    profile.scatter_add_(1, dist.reshape(1, -1).expand(H, -1), mass.reshape(H, -1))
    return (profile / (b * L)).cpu()


def source_qk(layer, arch, x: torch.Tensor, pos_emb, geo, rope: bool = True):
    """Post-RoPE queries and keys of a source attention block: [b, H, L, d], [b, G, L, d] (a layer
    without RoPE: as projected)."""
    attn = layer.get_submodule(arch.attention)
    b, L, _ = x.shape
    q = arch.project_normed(layer, x, "q", geo).reshape(b, L, geo.num_heads, geo.head_dim).transpose(1, 2)
    k = arch.project_normed(layer, x, "k", geo).reshape(b, L, geo.num_kv_heads, geo.head_dim).transpose(1, 2)
    scale = float(getattr(attn, "scaling", geo.head_dim**-0.5))
    if not rope:
        return q, k, scale
    cos, sin = pos_emb  # [b, L, rotary_dim]: RoPE turns the first rotary_dim dims of each head
    cos, sin = cos[:, None], sin[:, None]
    rd = geo.rotary_dim
    q = torch.cat([q[..., :rd] * cos + _rotate_half(q[..., :rd]) * sin, q[..., rd:]], dim=-1)
    k = torch.cat([k[..., :rd] * cos + _rotate_half(k[..., :rd]) * sin, k[..., rd:]], dim=-1)
    return q, k, scale


class StatsCollector:
    """One layer's `LayerStats`, fed batch by batch with the layer's attention input.

    The moment sees every token, the distance profile the first `profile_windows` windows, and the
    kept samples are every `stride`-th token of the whole set (the same tokens whatever the batch).
    With a QK-norm source the moments are of the normalised keys and values and of the normalised
    queries (module docstring); the samples stay attention inputs.
    """

    def __init__(self, layer, arch, geo, pos_emb, *, windows: int, seq_len: int, profile_windows: int,
                 sample_tokens: int, device, rope: bool = True, softcap: float | None = None):
        self.layer, self.arch, self.geo, self.pos_emb = layer, arch, geo, pos_emb
        self.rope, self.softcap = rope, softcap
        self.seq_len, self.profile_windows, self.sample_tokens = seq_len, profile_windows, sample_tokens
        self.stride = max(1, windows * seq_len // sample_tokens)
        kv_dim = 2 * geo.num_kv_heads * geo.head_dim
        self.moment = MomentAccumulator(kv_dim if arch.qk_norm else geo.hidden_size, device)
        self.q_moment = MomentAccumulator(geo.num_heads * geo.head_dim, device) if arch.qk_norm else None
        self.samples: list[torch.Tensor] = []
        self.kept = 0
        self.profile: torch.Tensor | None = None  # [H, L], summed over windows

    def add(self, x: torch.Tensor, first: int) -> None:
        """x: [b, L, D], the attention input (the input norm's output) of windows first .. first+b-1."""
        if self.q_moment is None:
            self.moment.add(x)
        else:
            arch, layer, geo = self.arch, self.layer, self.geo
            self.moment.add(torch.cat([arch.project_normed(layer, x, w, geo) for w in ("k", "v")], dim=-1))
            self.q_moment.add(arch.project_normed(layer, x, "q", geo))
        if self.kept < self.sample_tokens:
            offset = -first * self.seq_len % self.stride  # this batch's first token on the global stride
            picked = x.reshape(-1, x.shape[-1])[offset :: self.stride][: self.sample_tokens - self.kept]
            # A copy, not a view: a view would keep the whole batch alive.
            self.samples.append(picked.to("cpu", torch.float32, copy=True))
            self.kept += picked.shape[0]
        if first < self.profile_windows:
            q, k, scale = source_qk(self.layer, self.arch, x[: self.profile_windows - first], self.pos_emb, self.geo,
                                    self.rope)
            p = attention_distance_profile(q, k, scale, self.softcap) * q.shape[0]
            self.profile = p if self.profile is None else self.profile + p

    def result(self) -> LayerStats:
        distance = None if self.profile is None else self.profile / self.profile.sum(1, keepdim=True)
        return LayerStats(moment=self.moment.result(), tokens=self.moment.tokens, distance=distance,
                          samples=torch.cat(self.samples),
                          q_moment=None if self.q_moment is None else self.q_moment.result())


class StatsCache:
    """A folder of per-layer statistics plus the latest hidden states, tied to one fingerprint.

    A rerun with the same fingerprint resumes; a folder made with another fingerprint is refused.
    Files are written under a temporary name (with the writing process's id) and renamed, so a
    killed run leaves at most a temporary, which the next run removes.
    """

    def __init__(self, folder: Path, fingerprint: dict, about: dict | None = None):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
        self.reused_layers = 0  # layers whose statistics came from an earlier run (set by collect_stats)
        stamp = self.folder / FINGERPRINT_FILE
        if stamp.exists():
            try:
                found = json.loads(stamp.read_text())
            except (OSError, ValueError) as exc:
                raise self._damaged(stamp, exc) from None
            if found != fingerprint:
                diff = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
                raise LatentKVError(
                    f"The calibration cache {self.folder} was made for other settings (differs in: {', '.join(diff)}); "
                    "pass another --calib-cache folder or delete this one"
                )
            self._remove_stale_temporaries()
        else:
            self._write(stamp, lambda fh: fh.write(json.dumps(fingerprint, indent=1, sort_keys=True).encode()))
        # What the folder is for, for `latentkv cache list`; rewritten on each use (its time = last use).
        self._write(self.folder / ABOUT_FILE, lambda fh: fh.write(json.dumps(
            {**(about or {}), "last_used": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1).encode()))
        self._last_hidden_save = time.monotonic()

    # ---- writing: whole files or nothing ------------------------------------------------------

    def _write(self, path: Path, write) -> None:
        """Write `path` through a temporary file; a full disk or any failure leaves no temporary."""
        from latentkv.io.writer import is_disk_full

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # Through a Python file object, a full disk surfaces as OSError(ENOSPC) rather than
            # torch's bare "unexpected pos".
            with open(tmp, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, Exception) and is_disk_full(exc):
                raise LatentKVError(
                    f"disk full while writing the calibration cache {self.folder}; free space, or pass "
                    "--calib-cache FOLDER on a disk with room (or set LATENTKV_CACHE)"
                ) from exc
            if isinstance(exc, OSError):
                raise LatentKVError(
                    f"Could not write the calibration cache {self.folder} ({exc}); check its permissions or pass "
                    "--calib-cache FOLDER elsewhere"
                ) from exc
            raise

    def _remove_stale_temporaries(self) -> None:
        from latentkv.io.writer import pid_alive

        for tmp in self.folder.glob("*.tmp"):
            parts = tmp.name.rsplit(".", 2)  # .NAME.PID.tmp; a bare NAME.tmp is from before PIDs were named
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is None or not pid_alive(pid):
                tmp.unlink(missing_ok=True)
                log.info("removed %s, left by an interrupted calibration", tmp)

    def _damaged(self, path: Path, exc: BaseException) -> LatentKVError:
        return LatentKVError(
            f"The calibration cache file {path} is damaged ({type(exc).__name__}); delete the folder {self.folder} "
            "(or pass another --calib-cache) and rerun"
        )

    def _load(self, path: Path, mmap: bool = False) -> dict:
        try:
            obj = torch.load(path, weights_only=True, mmap=mmap)
        except Exception as exc:  # torch raises RuntimeError / UnpicklingError / EOFError for damaged files
            raise self._damaged(path, exc) from None
        if not isinstance(obj, dict):
            raise self._damaged(path, TypeError("not a dict"))
        return obj

    # ---- layers and extras ----------------------------------------------------------------

    def _layer_path(self, i: int) -> Path:
        return self.folder / f"layer_{i:04d}.pt"

    def has_layer(self, i: int) -> bool:
        return self._layer_path(i).exists()

    def load_layer(self, i: int) -> LayerStats:
        # Memory-mapped: tensors that are never read (the samples, outside the DeepSeek export) take
        # no memory, and the rest is file cache the OS can drop.
        path = self._layer_path(i)
        d = self._load(path, mmap=True)
        try:
            return LayerStats.from_dict(d)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise self._damaged(path, exc) from None

    def save_layer(self, i: int, stats: LayerStats) -> None:
        self._write(self._layer_path(i), lambda fh: torch.save(stats.to_dict(), fh))

    def save_extra(self, name: str, obj: dict) -> None:
        self._write(self.folder / f"{name}.pt", lambda fh: torch.save(obj, fh))

    def load_extra(self, name: str) -> dict | None:
        path = self.folder / f"{name}.pt"
        return self._load(path) if path.exists() else None

    def drop_extra(self, name: str) -> None:
        (self.folder / f"{name}.pt").unlink(missing_ok=True)

    def maybe_save_hidden(self, next_layer: int, hidden: torch.Tensor, every_s: float = 60.0, force: bool = False) -> None:
        """Checkpoint the activations entering `next_layer`, at most once a minute (they can be GBs)."""
        if not force and time.monotonic() - self._last_hidden_save < every_s:
            return
        self.save_extra("hidden", {"next_layer": torch.tensor(next_layer), "hidden": hidden.cpu()})
        self._last_hidden_save = time.monotonic()

    def load_hidden(self) -> tuple[int, torch.Tensor] | None:
        d = self.load_extra("hidden")
        if d is None:
            return None
        try:
            return int(d["next_layer"]), d["hidden"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise self._damaged(self.folder / "hidden.pt", exc) from None

    def drop_hidden(self) -> None:
        """Every layer is done: the resume point (as large as the calibration activations) is dead weight."""
        self.drop_extra("hidden")


FINGERPRINT_FILE = "fingerprint.json"
ABOUT_FILE = "about.json"


def checkpoint_fingerprint(folder: Path, weights=None) -> dict:
    """Identity of a checkpoint by content: config.json, every other JSON file of the folder (the
    shard index, generation config, GGUF source record) and a digest of the weights that covers
    every file's header and sampled bytes of every tensor (`LazyCheckpoint.content_digest`), so a
    fine-tune of the same shape in another folder never passes for its base."""
    from latentkv.io.lazy import LazyCheckpoint

    folder = Path(folder)
    weights = weights if weights is not None else LazyCheckpoint(folder)
    jsons = hashlib.sha256()
    for p in sorted(folder.glob("*.json")):
        if p.name != "config.json" and p.is_file():
            jsons.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return {
        "config_sha": hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:16],
        "json_sha": jsons.hexdigest()[:16],
        "weights_sha": weights.content_digest(),
    }


def default_cache_root() -> Path:
    from latentkv.io.source import latentkv_cache_dir

    return latentkv_cache_dir() / "calibration"
