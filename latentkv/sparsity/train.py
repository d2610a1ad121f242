"""Train an AttentionPredictor on a model's own attention: collect, fit, save.

1. collect: windows of training text go through the model's paged decode path (one dense prefill
   per window) with a recording ``SparseAttention``; every token's block masses per (layer, latent
   head) make one map ``M [L, n_blocks]`` (row t: the masses of query t; blocks after t are 0).
2. fit: a sample is (history M[t-T : t], target M[t]) for a random t >= T; the loss is the
   cross-entropy between the target masses and softmax(logits) over the blocks a policy actually
   ranks (not the forced sink / current blocks), i.e. a smooth surrogate of the attention recall of
   top-k. Validation windows report the recall at a budget for the predictor and for last-step.
3. save: ``attention_predictor.safetensors`` + ``attention_predictor.json`` (config + training facts).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentkv.errors import LatentKVError
from latentkv.sparsity.options import TrainOptions  # re-exported: its flags are read without torch
from latentkv.sparsity.predictor import AttentionPredictor, PredictorConfig, save_predictor

log = logging.getLogger(__name__)


def training_windows(tokenizer, data: str, exclude: tuple[str, ...], windows: int, seq_len: int, seed: int):
    """[windows, seq_len] token ids from ``data`` (a folder of .txt/.jsonl/.parquet, or one file)."""
    from latentkv.calibration.data import (TEXT_SUFFIXES, TextSource, enough_text, read_pieces, sample_windows,
                                           tokenize_pieces)
    from latentkv.data import logical_name, logical_suffix, resolve_text

    path = Path(resolve_text(data)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if logical_suffix(p) in TEXT_SUFFIXES
                       and p.name not in exclude and logical_name(p) not in exclude)
        if not files:
            raise LatentKVError(f"no text files left under {path} after excluding {', '.join(exclude)}.")
        pieces = (piece for f in files for piece in read_pieces(TextSource(str(f))))
    else:
        pieces = read_pieces(TextSource(data))
    tokens = tokenize_pieces(tokenizer, pieces, enough=enough_text(windows, seq_len))
    return sample_windows(tokens, windows, seq_len, seed)


def with_repeats(windows: torch.Tensor, repeats: int, span: int, seed: int) -> torch.Tensor:
    """Each window with ``repeats`` of its spans of ``span`` tokens copied over a later part of it (at
    least ``span`` tokens after the span's end). Books rarely repeat themselves, so their attention
    rarely shows a copy: a block that lights up at one step and stays the target while the copy runs,
    which is what retrieval and quoting in long prompts look like. A predictor trained on books alone
    learns that a fresh spike fades; the repeats show it the other case."""
    if repeats == 0:
        return windows
    gen = torch.Generator().manual_seed(seed + 7)
    out = windows.clone()
    length = windows.shape[1]
    for row in out:
        for _ in range(repeats):
            src = int(torch.randint(0, length - 3 * span, (1,), generator=gen))
            dst = int(torch.randint(src + 2 * span, length - span + 1, (1,), generator=gen))
            row[dst : dst + span] = row[src : src + span].clone()
    return out


@torch.no_grad()
def collect_maps(model, windows: torch.Tensor, page_size: int, progress=None) -> list[torch.Tensor]:
    """Block-mass maps [L, n_blocks] (float16) of every (window, layer, latent head)."""
    from latentkv.runtime.decode import PagedLatentCache, prefill
    from latentkv.sparsity.policies import SparseConfig
    from latentkv.sparsity.runtime import SparseAttention

    maps = []
    for i, ids in enumerate(windows.tolist()):
        cache = PagedLatentCache.for_model(model, max_seqs=1, max_seq_len=len(ids), page_size=page_size,
                                           backend="reference")
        cache.sparsity = SparseAttention(SparseConfig("dense"), page_size, keep_history=None)
        seq = cache.add_sequence()
        prefill(model, cache, seq, ids, chunk=256)
        for (s, layer), hist in sorted(cache.sparsity.history.items()):
            maps.extend(h.half() for h in hist)  # [L, n] per latent head
        if progress is not None:
            progress(i)
    return maps


def _samples(maps: list[torch.Tensor], count: int, history: int, page_size: int, gen: torch.Generator):
    """count random (features source, target, rankable mask): x masses [B, T, N], y [B, N], mask [B, N]."""
    pick = torch.randint(len(maps), (count,), generator=gen)
    length, n_max = maps[0].shape
    t = torch.randint(history, length, (count,), generator=gen)
    x = torch.stack([maps[m][s - history : s] for m, s in zip(pick.tolist(), t.tolist())]).float()
    y = torch.stack([maps[m][s] for m, s in zip(pick.tolist(), t.tolist())]).float()
    n_exist = t // page_size + 1  # blocks that exist at step t
    return x, y, _rankable(n_exist, n_max), n_exist


def _rankable(n_exist: torch.Tensor, n_max: int) -> torch.Tensor:
    blocks = torch.arange(n_max)[None]
    return (blocks >= 1) & (blocks < n_exist[:, None] - 1)  # not the sink, not the current block


class OnPolicyHistories:
    """Training examples whose histories are what ``SparseAttention`` records when the predictor being
    trained decodes at ``budget`` with a dense refresh every ``refresh`` steps (``histories.rollout``).

    Each round replays ``steps`` decode steps after ``starts`` random prefill lengths over every map;
    the first round chooses blocks by last-step (the untrained predictor is last-step), later rounds
    (``rerecord``) by the current predictor, whose own choices shape the rows it will read (DAgger).
    A sample: history = the T rows before a decoded step, target = that step's dense masses."""

    def __init__(self, maps: list[torch.Tensor], latent_heads: int, config: PredictorConfig, *, refresh: int,
                 budget: float, starts: int, steps: int, gen: torch.Generator):
        from latentkv.sparsity.policies import SparseConfig

        length = maps[0].shape[0]
        if length < config.history + steps:
            raise LatentKVError(f"maps of {length} rows are too short for a history of {config.history} and "
                                f"{steps} replayed steps.")
        self.maps, self.latent_heads, self.config = maps, latent_heads, config
        self.starts, self.steps, self.gen = starts, steps, gen
        # the model goes to rollout itself; the config only needs a predictor named
        self.policy = {name: SparseConfig(name, budget=budget, refresh=refresh, predictor="training")
                       for name in ("last-step", "predictor")}
        self.rerecord(None)

    @torch.no_grad()
    def rerecord(self, predictor: AttentionPredictor | None) -> None:
        """Replay the decodes with ``predictor``'s choices (None: last-step's) at new prefill lengths."""
        from latentkv.sparsity.histories import map_groups, rollout

        T, steps = self.config.history, self.steps
        prefills = torch.randint(T, self.maps[0].shape[0] - steps + 1, (self.starts,), generator=self.gen)
        policy = self.policy["last-step" if predictor is None else "predictor"]
        windows, targets = [], []
        for p in prefills.tolist():
            maps = map_groups(self.maps, self.latent_heads, slice(p - T, p + steps))
            decoded = rollout(maps, p, steps, policy, self.config.page_size, predictor, first_row=p - T)
            windows.append(torch.cat([maps[:, :, :T], decoded.rows], dim=2).flatten(0, 1).half())
            targets.append(maps[:, :, T:].flatten(0, 1).half())
        self.prefills = prefills
        self.windows = torch.stack(windows)  # [starts, maps, T + steps, N]: T prefill rows, then the decoded
        self.targets = torch.stack(targets)  # [starts, maps, steps, N]: the dense masses of the decoded steps

    def sample(self, count: int):
        """count random (history, target, rankable mask, blocks existing), as ``_samples``."""
        T = self.config.history
        s = torch.randint(self.starts, (count,), generator=self.gen)
        m = torch.randint(self.windows.shape[1], (count,), generator=self.gen)
        i = torch.randint(self.steps, (count,), generator=self.gen)
        x = self.windows[s[:, None], m[:, None], i[:, None] + torch.arange(T)].float()
        y = self.targets[s, m, i].float()
        n_exist = (self.prefills[s] + i) // self.config.page_size + 1
        return x, y, _rankable(n_exist, y.shape[-1]), n_exist


OBJECTIVES = ("ce", "recall")


def _loss(model: AttentionPredictor, x, y, rankable, n_exist=None, budget: float | None = None,
          objective: str = "ce") -> torch.Tensor:
    """"ce": the cross-entropy between the target masses (renormalised over the rankable blocks) and
    softmax(logits). "recall": what a top-k choice at ``budget`` keeps -- one minus the target mass
    inside a soft top-k of the logits (a sigmoid around the midpoint between the k-th and (k+1)-th
    logit, k the blocks the budget leaves after the forced ones), plus 0.1 x the cross-entropy to
    keep the ranking of the blocks below the cut informative."""
    logits = model(model.feature(x)).masked_fill(~rankable, float("-inf"))
    target = y * rankable
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-12)
    logp = torch.log_softmax(logits, -1).masked_fill(~rankable, 0.0)
    ce = -(target * logp).sum(-1).mean()
    if objective == "ce":
        return ce
    from latentkv.sparsity.policies import SparseConfig

    cfg = SparseConfig("window", budget=budget)
    n_rank = rankable.sum(-1)
    k = torch.tensor([cfg.blocks_for(int(n)) for n in n_exist.tolist()]) - (n_exist - n_rank)  # free choices
    k = k.clamp(min=1)
    ordered = logits.detach().sort(-1, descending=True).values.clamp_min(-1e4)
    kth = ordered.gather(1, (k - 1).clamp(max=ordered.shape[1] - 1)[:, None])
    nxt = ordered.gather(1, k.clamp(max=ordered.shape[1] - 1)[:, None])
    cut = (kth + nxt) / 2
    keep = torch.sigmoid(logits.clamp_min(-1e4) - cut).masked_fill(~rankable, 0.0)
    full = (k >= n_rank)[:, None]  # the budget covers every rankable block: nothing to learn
    kept = torch.where(full, target, target * keep).sum(-1)
    return (1 - kept).mean() + 0.1 * ce


@torch.no_grad()
def recall_at(scores: torch.Tensor, y: torch.Tensor, n_exist: torch.Tensor, budget: float) -> float:
    """Mean true mass inside the blocks the policy keeps (sink + current + top scores) at ``budget``."""
    from latentkv.sparsity.policies import SparseConfig, choose_blocks

    cfg = SparseConfig("window", budget=budget)
    total = 0.0
    for row in range(y.shape[0]):
        n = int(n_exist[row])
        ids = choose_blocks(scores[row, :n], cfg.blocks_for(n))
        total += float(y[row, ids].sum() / y[row, :n].sum().clamp_min(1e-12))
    return total / y.shape[0]


@dataclass(frozen=True)
class Replay:
    """How ``fit`` replays sparse decodes for histories with refresh > 1 (``OnPolicyHistories``):
    ``starts`` prefill lengths x ``steps`` decode steps per round, a new round every ``every``
    optimizer steps; validation replays ``val_steps`` steps after each of ``val_starts`` lengths."""

    starts: int = 4
    steps: int = 64
    every: int = 100
    val_starts: int = 4
    val_steps: int = 64


def fit(maps: list[torch.Tensor], val_maps: list[torch.Tensor], config: PredictorConfig, *, steps: int,
        batch_size: int, lr: float, budget: float, seed: int, progress=None, objective: str = "ce",
        report_budgets: tuple[float, ...] = (), refresh: int = 1, latent_heads: int = 1,
        replay: Replay = Replay()) -> tuple[AttentionPredictor, dict]:
    """Train on ``maps`` with ``objective`` (``_loss``; "recall" at ``budget``); report validation loss
    and recall (predictor and last-step) at ``budget`` and at each of ``report_budgets``.

    refresh 1: every history row is the dense masses (the maps' own rows). refresh > 1: the
    histories are those the predictor's own decode at ``budget`` records (``OnPolicyHistories``;
    ``latent_heads`` maps in a row are one (window, layer)), and the validation recall is that of
    each policy decoding from its own histories (``histories.mean_recall``)."""
    if objective not in OBJECTIVES:
        raise LatentKVError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}.")
    if refresh < 1 or len(maps) % latent_heads or len(val_maps) % latent_heads:
        raise LatentKVError(f"refresh must be >= 1 and the maps come {latent_heads} to a (window, layer); got "
                            f"refresh {refresh}, {len(maps)} and {len(val_maps)} maps.")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AttentionPredictor(config)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = max(1, steps // 20)  # linear warm-up, then cosine decay to 0
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.5 * (1 + math.cos(math.pi * i / steps))))
    on_policy = None
    if refresh == 1:
        val = _samples(val_maps, 2048, config.history, config.page_size, torch.Generator().manual_seed(seed + 1))
    else:
        histories = dict(latent_heads=latent_heads, config=config, refresh=refresh, budget=budget)
        on_policy = OnPolicyHistories(maps, **histories, starts=replay.starts, steps=replay.steps, gen=gen)
        val = OnPolicyHistories(val_maps, **histories, starts=replay.val_starts, steps=replay.val_steps,
                                gen=torch.Generator().manual_seed(seed + 1)).sample(2048)  # last-step's histories
    log_every = max(1, steps // 10)
    history = []
    for step in range(1, steps + 1):
        if on_policy is None:
            x, y, rankable, n_exist = _samples(maps, batch_size, config.history, config.page_size, gen)
        else:
            if step > 1 and (step - 1) % replay.every == 0:
                on_policy.rerecord(model.eval())
                model.train()
            x, y, rankable, n_exist = on_policy.sample(batch_size)
        loss = _loss(model, x, y, rankable, n_exist, budget, objective)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, float(loss.detach()))
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                val_loss = float(_loss(model, *val, budget, objective))
            history.append({"step": step, "train_loss": float(loss.detach()), "val_loss": val_loss})
            log.info("step %d: train loss %.4f, validation loss %.4f", step, float(loss.detach()), val_loss)
    model.eval()
    x, y, _, n_exist = val
    with torch.no_grad():
        pred = model(model.feature(x))
    if on_policy is None:
        def recalls(b):
            return {"predictor": recall_at(pred, y, n_exist, b), "last_step": recall_at(x[:, -1], y, n_exist, b)}
    else:
        from latentkv.sparsity.histories import mean_recall
        from latentkv.sparsity.policies import SparseConfig

        length = val_maps[0].shape[0]
        prefills = torch.linspace(config.history, length - replay.val_steps, replay.val_starts).long().tolist()

        def recalls(b):
            run = dict(maps=val_maps, latent_heads=latent_heads, page_size=config.page_size, prefills=prefills,
                       steps=replay.val_steps)
            return {"predictor": mean_recall(**run, config=SparseConfig("predictor", b, refresh=refresh,
                                                                        predictor="training"), predictor=model),
                    "last_step": mean_recall(**run, config=SparseConfig("last-step", b, refresh=refresh))}
    at_budget = recalls(budget)
    report = {
        "val_samples": int(y.shape[0]),
        "val_loss": history[-1]["val_loss"],
        "val_recall_predictor": at_budget["predictor"],
        "val_recall_last_step": at_budget["last_step"],
        "val_recall_budget": budget,
        "val_refresh": refresh,
        "objective": objective,
        "val_recall": {str(b): recalls(b) for b in report_budgets},
        "loss_curve": history,
    }
    return model, report


def train_predictor(opts: TrainOptions, progress_factory=None) -> dict:
    """`latentkv predictor train`: collect maps from ``opts.model`` on ``opts.data``, fit, save."""
    from latentkv.runtime.decode import latent_attentions
    from latentkv.io.source import open_source
    from latentkv.modeling import load_model

    from latentkv.io.writer import OutputFolder

    out = OutputFolder(opts.out, overwrite=opts.overwrite, sources=(opts.model, opts.data))  # checked before any work
    t0 = time.perf_counter()
    source = open_source(opts.model)
    model = load_model(source.folder)
    latent_heads = latent_attentions(model)[0].latent_heads  # (and a clear error for models without latent attention)
    windows = training_windows(source.tokenizer(), opts.data, opts.exclude, opts.windows, opts.seq_len, opts.seed)
    windows = with_repeats(windows, opts.repeats, opts.repeat_len, opts.seed)
    n_val = max(1, opts.windows // 10)
    advance = progress_factory("collecting attention", opts.windows) if progress_factory else None
    maps = collect_maps(model, windows, opts.page_size, progress=advance)
    per_window = len(maps) // opts.windows
    train_maps, val_maps = maps[: -n_val * per_window], maps[-n_val * per_window :]
    log.info("collected %d maps of %s (%d validation) in %.0f s", len(maps), tuple(maps[0].shape), len(val_maps),
             time.perf_counter() - t0)
    config = PredictorConfig(history=opts.history, channels=opts.channels, page_size=opts.page_size)
    advance = progress_factory("training", opts.steps) if progress_factory else None
    predictor, report = fit(train_maps, val_maps, config, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
                            budget=opts.budget, seed=opts.seed, refresh=opts.refresh, latent_heads=latent_heads,
                            progress=(lambda step, loss: advance(step)) if advance else None)
    report = {**report, "seconds": time.perf_counter() - t0, "parameters": sum(p.numel() for p in predictor.parameters())}
    extra = {"trained_on": {**asdict(opts), "maps": len(train_maps)}, "report": report}
    with out:
        save_predictor(predictor, out.tmp, extra=json.loads(json.dumps(extra, default=str)))
    log.info("validation recall at %.0f%% of blocks: predictor %.4f, last-step %.4f", 100 * opts.budget,
             report["val_recall_predictor"], report["val_recall_last_step"])
    return {"out": str(out.path), **{k: v for k, v in report.items() if k != "loss_curve"}}

