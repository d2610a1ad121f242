"""The AttentionPredictor (Yang et al., arXiv 2502.04077): a small CNN that reads the last T steps
of block-pooled attention masses of one (layer, latent head) and forecasts the next step's.

One model is shared by every layer and head (as in the paper): the patterns it must recognise --
vertical stripes (sinks, heavy blocks), diagonals (re-access drifting block by block), the local
band -- are shapes in the [T, n_blocks] map, not facts of one layer, and sharing gives every
parameter 30x more training maps and keeps one file. The convolutions slide over blocks, so any
context length works.

    x = feature(masses)                [B, T, N]   log-scaled into [0, 1]
    h = relu(conv3x3(relu(conv3x3(x))))  [B, C, T, N]
    z = sum_t w[c, t] h[:, c, t]       [B, C, N]   learned weighting of the steps (the paper pools them)
    logits = conv1x1(z) + a * x[:, -1]  [B, N]      a skip from the last step

With ``keep_last_step`` (the default of a new predictor) the forecast is the element-wise maximum of
that softmax and the last step's masses (normalised): the model can raise a block above what the last
step gave it, never lower one below. A block that has just lit up (a copy, a retrieval) is then
never dropped for being new -- on books a fresh spike usually fades, so a free model learns to
discount it, and loses exactly the steps a retrieval needs.

It starts as exactly "last-step": the head starts at zero and ``a`` at -log(mass_floor), so the logits
start as the log of the last step's masses (+ a constant) and their softmax as those masses; training
moves it only where the history says more than the last step does.

Saved as ``attention_predictor.safetensors`` + ``attention_predictor.json`` in one folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from latentkv.errors import LatentKVError

WEIGHTS_FILE = "attention_predictor.safetensors"
CONFIG_FILE = "attention_predictor.json"


@dataclass(frozen=True)
class PredictorConfig:
    """history: steps T the model reads (4-64); channels: conv width (8-32); page_size: tokens per
    block the masses were pooled over (the predictor is used with the same page size);
    mass_floor: masses below it read as it (the feature's zero); keep_last_step: the forecast is at
    least the last step's masses (module docstring)."""

    history: int = 16
    channels: int = 8
    page_size: int = 16
    mass_floor: float = 1e-6
    keep_last_step: bool = True

    def __post_init__(self):
        if self.history < 2 or self.channels < 1 or self.page_size < 1 or not 0 < self.mass_floor < 1:
            raise LatentKVError(f"invalid predictor config {self}: history >= 2, channels >= 1, page_size >= 1, "
                                "0 < mass_floor < 1.")


class AttentionPredictor(nn.Module):
    def __init__(self, config: PredictorConfig):
        super().__init__()
        self.config = config
        c = config.channels
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.step_weights = nn.Parameter(torch.full((c, config.history), 1.0 / config.history))
        self.head = nn.Conv1d(c, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip = nn.Parameter(torch.tensor(-math.log(config.mass_floor)))

    def feature(self, masses: torch.Tensor) -> torch.Tensor:
        """Block masses in [0, 1] -> log scale in [0, 1] (floor -> 0, 1 -> 1); absent blocks are 0."""
        floor = self.config.mass_floor
        return (masses.float().clamp(floor, 1.0).log() - math.log(floor)) / -math.log(floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: features [B, T, N] (oldest step first) -> logits [B, N] for the next step."""
        h = torch.relu(self.conv1(x[:, None]))
        h = torch.relu(self.conv2(h))  # [B, C, T, N]
        z = torch.einsum("bctn,ct->bcn", h, self.step_weights)
        logits = self.head(z)[:, 0] + self.skip * x[:, -1]
        if not self.config.keep_last_step:
            return logits
        log_floor = math.log(self.config.mass_floor)
        last = torch.log_softmax(x[:, -1] * -log_floor, dim=-1)  # the last step's masses (>= floor), normalised
        return torch.maximum(torch.log_softmax(logits, dim=-1), last)

    @torch.no_grad()
    def predict(self, history: torch.Tensor) -> torch.Tensor:
        """history: masses [B, t, N] of the last t steps (t < T: older steps read as empty) ->
        predicted masses [B, N] (softmax over blocks)."""
        T = self.config.history
        x = self.feature(history[:, -T:])
        if x.shape[1] < T:
            x = torch.nn.functional.pad(x, (0, 0, T - x.shape[1], 0))
        return torch.softmax(self(x), dim=-1)


def save_predictor(model: AttentionPredictor, folder: str | Path, extra: dict | None = None) -> Path:
    """Write the weights and config (+ ``extra``: training facts) into ``folder`` (written to a
    temporary name and renamed, so a failed save leaves no half-written predictor)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    (folder / (CONFIG_FILE + ".tmp")).write_text(json.dumps({**asdict(model.config), **(extra or {})}, indent=2))
    tmp.replace(folder / WEIGHTS_FILE)
    (folder / (CONFIG_FILE + ".tmp")).replace(folder / CONFIG_FILE)
    return folder


def load_predictor(folder: str | Path) -> AttentionPredictor:
    from safetensors.torch import load_file

    folder = Path(folder)
    weights, config_path = folder / WEIGHTS_FILE, folder / CONFIG_FILE
    if not weights.exists() or not config_path.exists():
        raise LatentKVError(
            f"{folder} holds no AttentionPredictor ({WEIGHTS_FILE} + {CONFIG_FILE}); train one with "
            "`latentkv predictor train MODEL --out FOLDER`."
        )
    raw = json.loads(config_path.read_text())
    raw.setdefault("keep_last_step", False)  # saved before the option existed: trained without it
    fields = PredictorConfig.__dataclass_fields__
    model = AttentionPredictor(PredictorConfig(**{k: v for k, v in raw.items() if k in fields}))
    try:
        model.load_state_dict(load_file(str(weights)))
    except RuntimeError as exc:
        raise LatentKVError(f"{weights} does not match its config {config_path}: {exc}") from None
    return model.eval()
