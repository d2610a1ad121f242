"""KV cache storage formats as data, with PyTorch reference quantize / dequantize and exact byte counts.

A format is an element encoding and a grouping, written `ENCODING[/GROUPING]`:

    bf16, fp16             a plain cast, no scale
    fp8_e4m3               FP8 (E4M3, saturating at +-448); bare: no scale (vLLM's default scale 1.0),
                           with a grouping: one float32 scale per group (amax / 448, as FlashMLA)
    int8, int4, int3, int2 asymmetric integers: per group a float16 scale and a float16 zero-point
                           (the group minimum), KIVI's layout; codes packed 8 / 4 / 3 / 2 bits (int3:
                           a token's codes as one dense bit string, 8 codes in 3 bytes)

    /token                 one group per token over every head of the cached tensor
    /head                  one group per token and head
    /g<N>                  groups of N consecutive values of one head of one token (the last group of a
                           head may be shorter when N does not divide the head width)
    /channel<N>            KIVI's per-channel keys: one group per channel (head and dim) over N
                           consecutive tokens; the N-1 or fewer newest tokens of an unfinished group are
                           kept unquantized (KIVI's residual) and are not counted in the bytes, which
                           are the per-token share of full groups

A cache tensor is [batch, heads, tokens, width], the layout transformers' caches use for keys and
values; a latentkv model caches its latent as one head of width r and its RoPE key as one head (GTA-S:
one head per map head).

The second half names what a model caches (its parts: keys and values, or a latent and a RoPE key),
parses a cache format per part (`--kv-cache`, `--cache-format`), says which formats the paged latent
cache stores, and reads and writes the format a converted model's config carries (`kv_cache_format`).
Conversion, the decode kernels, the runtime and evaluation all read formats from here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError


@dataclass(frozen=True)
class Encoding:
    """How one value is stored: `kind` is "cast" (a narrower float dtype), "fp8" (scaled float8) or
    "int" (asymmetric integer codes); `group_bytes` is what each group stores beside its codes."""

    name: str
    kind: str
    bits: int
    dtype: torch.dtype | None
    group_bytes: int
    default_grouping: str
    note: str


ENCODINGS: dict[str, Encoding] = {
    e.name: e
    for e in (
        Encoding("bf16", "cast", 16, torch.bfloat16, 0, "none", "bfloat16 values"),
        Encoding("fp16", "cast", 16, torch.float16, 0, "none", "float16 values"),
        Encoding("fp8_e4m3", "fp8", 8, torch.float8_e4m3fn, 4, "none", "float8 E4M3 codes, float32 scale per group"),
        Encoding("int8", "int", 8, None, 4, "head", "8-bit codes, float16 scale and zero-point per group"),
        Encoding("int4", "int", 4, None, 4, "g32", "4-bit codes, float16 scale and zero-point per group"),
        Encoding("int3", "int", 3, None, 4, "g32", "3-bit codes, float16 scale and zero-point per group"),
        Encoding("int2", "int", 2, None, 4, "g32", "2-bit codes, float16 scale and zero-point per group"),
    )
}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "fp8": "fp8_e4m3", "float8_e4m3": "fp8_e4m3"}
FP8_MAX = 448.0  # largest finite float8 E4M3 (fn) value
GROUPING = re.compile(r"^(none|token|head|g(\d+)|channel(\d+))$")


@dataclass(frozen=True)
class KVFormat:
    """One cache format: an encoding and a grouping ("none", "token", "head", "g<N>", "channel<N>")."""

    encoding: Encoding
    grouping: str

    @property
    def name(self) -> str:
        return self.encoding.name if self.grouping == "none" else f"{self.encoding.name}/{self.grouping}"

    @property
    def group_size(self) -> int:
        """N of g<N> or channel<N> (0 otherwise)."""
        match = GROUPING.match(self.grouping)
        return int(match.group(2) or match.group(3) or 0)

    @property
    def per_channel(self) -> bool:
        return self.grouping.startswith("channel")

    def groups_per_token(self, heads: int, width: int) -> float:
        """Scale groups a token owns in a [heads, width] slot (a per-channel group is shared by N tokens)."""
        if self.grouping == "none":
            return 0
        if self.grouping == "token":
            return 1
        if self.grouping == "head":
            return heads
        if self.per_channel:
            return heads * width / self.group_size
        return heads * math.ceil(width / self.group_size)

    def bytes_per_token(self, heads: int, width: int) -> float:
        """Bytes one token takes in a [heads, width] cache slot: codes packed per token, plus scales
        and zero-points (exact for whole tokens; per-channel formats: the token's share of full groups)."""
        codes = math.ceil(heads * width * self.encoding.bits / 8)
        return codes + self.encoding.group_bytes * self.groups_per_token(heads, width)


def parse_format(spec: str) -> KVFormat:
    """`ENCODING[/GROUPING]` -> KVFormat; a LatentKVError naming the accepted forms otherwise."""
    text = spec.strip().lower()
    name, _, grouping = text.partition("/")
    name = ALIASES.get(name, name)
    if name not in ENCODINGS:
        raise LatentKVError(f"Unknown KV cache encoding {spec!r}; use one of {', '.join(ENCODINGS)} "
                            "optionally with /token, /head, /g<N> or /channel<N> (e.g. int4/g32, fp8_e4m3/g128)")
    encoding = ENCODINGS[name]
    grouping = grouping or encoding.default_grouping
    match = GROUPING.match(grouping)
    if match is None or (match.group(2) or match.group(3) or "1") == "0":
        raise LatentKVError(f"Unknown grouping {grouping!r} in {spec!r}; use token, head, g<N> or channel<N> (N > 0)")
    if encoding.kind == "cast" and grouping != "none":
        raise LatentKVError(f"{encoding.name} is a plain cast and takes no grouping; write {encoding.name}")
    if encoding.kind == "int" and grouping == "none":
        raise LatentKVError(f"{encoding.name} needs scale groups: /token, /head, /g<N> or /channel<N>")
    return KVFormat(encoding, grouping)


# ---- reference quantization -------------------------------------------------------------------------------


def fp16_at_most(x: torch.Tensor) -> torch.Tensor:
    """A float16-representable value <= x (as float32): nearest rounding, stepped down where it rounded up."""
    nearest = x.to(torch.float16).float()
    # a step of |x| 2^-10 + 2^-24 exceeds half the float16 spacing at x (normal and subnormal)
    lower = (x - x.abs() * 2.0**-10 - 2.0**-24).to(torch.float16).float()
    return torch.where(nearest > x, lower, nearest)


def fp16_at_least(x: torch.Tensor) -> torch.Tensor:
    """A float16-representable value >= x (as float32)."""
    nearest = x.to(torch.float16).float()
    upper = (x + x.abs() * 2.0**-10 + 2.0**-24).to(torch.float16).float()
    return torch.where(nearest < x, upper, nearest)


def grouped(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """x [b, heads, t, width] -> [..., n]: every scale group along the last axis (ragged g<N> groups
    padded by repeating the head's last value, which leaves each group's range unchanged)."""
    b, h, t, w = x.shape
    if fmt.grouping == "token":
        return x.transpose(1, 2).reshape(b, t, 1, h * w)
    if fmt.grouping in ("head", "none"):
        return x[..., None, :]
    if fmt.per_channel:
        n = fmt.group_size
        if t % n:
            raise ValueError(f"per-channel groups of {n} tokens need a multiple of {n} tokens, got {t}")
        return x.reshape(b, h, t // n, n, w).transpose(-1, -2)  # [b, h, t/n, w, n]
    n = fmt.group_size
    groups = math.ceil(w / n)
    index = torch.arange(groups * n, device=x.device).clamp(max=w - 1)
    return x[..., index].reshape(b, h, t, groups, n)


def ungrouped(g: torch.Tensor, fmt: KVFormat, shape: torch.Size) -> torch.Tensor:
    """The inverse of `grouped` (padding dropped)."""
    b, h, t, w = shape
    if fmt.grouping == "token":
        return g.reshape(b, t, h, w).transpose(1, 2)
    if fmt.grouping in ("head", "none"):
        return g[..., 0, :]
    if fmt.per_channel:
        return g.transpose(-1, -2).reshape(b, h, t, w)
    return g.flatten(-2)[..., :w]


def encode(g: torch.Tensor, encoding: Encoding, checked: bool = True):
    """Grouped float32 values [..., n] -> (codes, scale, zero) for a cast or integer encoding: codes in
    the stored dtype (uint8 for integers, unpacked), scale / zero per group ([..., 1], float16), or None.
    checked: refuse values whose scale float16 cannot hold (a host sync: the paged cache, whose writes a
    CUDA graph may capture, passes False and stores what the arithmetic gives)."""
    if encoding.kind == "cast":
        return g.to(encoding.dtype), None, None
    levels = 2**encoding.bits - 1
    zero = fp16_at_most(g.amin(-1, keepdim=True))
    # the smallest float16 step that still reaches the group's maximum, so every value is in range
    scale = fp16_at_least(((g.amax(-1, keepdim=True) - zero) / levels).clamp(min=2.0**-24))
    if checked and not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        raise LatentKVError("A KV value is outside float16's range, so its integer scale cannot be stored; "
                            "use fp8_e4m3/g<N>, bf16 or fp16")
    codes = torch.round((g - zero) / scale).clamp(0, levels).to(torch.uint8)
    return codes, scale.to(torch.float16), zero.to(torch.float16)


def encode_fp8(g: torch.Tensor, scaled: bool):
    """Grouped float32 values -> (float8 codes, float32 scale or None); saturating at +-448."""
    if not scaled:
        return g.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), None
    scale = (g.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def decode(codes: torch.Tensor, scale, zero) -> torch.Tensor:
    """Stored codes (and scale / zero-point) -> float32 values."""
    values = codes.float()
    if scale is not None:
        values = values * scale.float()
    if zero is not None:
        values = values + zero.float()
    return values


def codes_and_scales(x: torch.Tensor, fmt: KVFormat, checked: bool = True):
    """x [b, heads, t, width] -> (codes, scale, zero), grouped as `grouped(x, fmt)`."""
    g = grouped(x.float(), fmt)
    if fmt.encoding.kind == "fp8":
        codes, scale = encode_fp8(g, scaled=fmt.grouping != "none")
        return codes, scale, None
    return encode(g, fmt.encoding, checked)


def fake_quantize(x: torch.Tensor, fmt: KVFormat) -> torch.Tensor:
    """What a cache in `fmt` gives back for x [b, heads, t, width]: quantized and dequantized, in x's dtype."""
    codes, scale, zero = codes_and_scales(x, fmt)
    return ungrouped(decode(codes, scale, zero), fmt, x.shape).to(x.dtype)


@dataclass
class Packed:
    """x [b, heads, t, width] as a cache in `fmt` stores it: `codes` one row per token (integer codes
    packed 8 / bits to a byte), `scale` and `zero` per group as stored."""

    fmt: KVFormat
    shape: torch.Size
    codes: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero) if t is not None)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] < 2^bits -> [..., ceil(n * bits / 8)] bytes, lowest bits first. Widths that do
    not divide 8 (3 bits) are packed as one dense bit string per row, a code may straddle two bytes."""
    if 8 % bits:
        return _pack_dense(codes, bits)
    per_byte = 8 // bits
    n = codes.shape[-1]
    padded = torch.nn.functional.pad(codes, (0, -n % per_byte)).view(*codes.shape[:-1], -1, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (padded << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    if 8 % bits:
        return _unpack_dense(packed, bits, n)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & (2**bits - 1)
    return codes.flatten(-2)[..., :n]


def _pack_dense(codes: torch.Tensor, bits: int) -> torch.Tensor:
    n = codes.shape[-1]
    planes = (codes[..., None] >> torch.arange(bits, dtype=torch.uint8, device=codes.device)) & 1  # [..., n, bits]
    stream = torch.nn.functional.pad(planes.flatten(-2), (0, -(n * bits) % 8)).view(*codes.shape[:-1], -1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(-1, dtype=torch.uint8)


def _unpack_dense(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    stream = (packed[..., None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    planes = stream.flatten(-2)[..., : n * bits].view(*packed.shape[:-1], n, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)


def token_rows(g: torch.Tensor, fmt: KVFormat, shape: torch.Size) -> torch.Tensor:
    """Grouped codes -> one row of real (unpadded) codes per token: [b, t, heads * width]."""
    b, h, t, w = shape
    return ungrouped(g, fmt, shape).transpose(1, 2).reshape(b, t, h * w)


def quantize(x: torch.Tensor, fmt: KVFormat, checked: bool = True) -> Packed:
    """x [b, heads, t, width] -> what the cache stores (per-channel formats: t a multiple of N)."""
    codes, scale, zero = codes_and_scales(x, fmt, checked)
    rows = token_rows(codes, fmt, x.shape)
    if fmt.encoding.kind == "int" and fmt.encoding.bits < 8:
        rows = pack_bits(rows, fmt.encoding.bits)
    return Packed(fmt, x.shape, rows, scale, zero)


def dequantize(packed: Packed, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    fmt, (b, h, t, w) = packed.fmt, packed.shape
    rows = packed.codes
    if fmt.encoding.kind == "int" and fmt.encoding.bits < 8:
        rows = unpack_bits(rows, fmt.encoding.bits, h * w)
    x = rows.view(b, t, h, w).transpose(1, 2)
    g = grouped(x, fmt)  # codes regrouped as at encoding (padding repeats a real code)
    return ungrouped(decode(g, packed.scale, packed.zero), fmt, packed.shape).to(dtype)


def error_bound(x: torch.Tensor, fmt: KVFormat, packed: Packed) -> torch.Tensor:
    """The largest |x - dequantize(quantize(x))| the format allows, per value of x: half a step of the
    stored scale (integers), half a float8 / bf16 / fp16 spacing (floats), plus float32 rounding."""
    x = x.float()
    fp32 = 4 * 2.0**-24 * x.abs()
    if fmt.encoding.kind == "cast":
        mantissa = {torch.bfloat16: 7, torch.float16: 10}[fmt.encoding.dtype]
        tiny = torch.finfo(fmt.encoding.dtype).smallest_normal * 2.0**-mantissa  # subnormal spacing
        return torch.maximum(x.abs() * 2.0 ** -(mantissa + 1), torch.full_like(x, tiny / 2)) + fp32
    if fmt.encoding.kind == "fp8":
        scale = torch.ones_like(x) if packed.scale is None else ungrouped(
            packed.scale.float().expand(grouped(x, fmt).shape), fmt, x.shape)
        # 3 mantissa bits: half a spacing is 2^-4 of the value; subnormal spacing 2^-9 (times the scale)
        return torch.maximum(x.abs() * 2.0**-4, scale * 2.0**-10) + fp32
    scale = ungrouped(packed.scale.float().expand(grouped(x, fmt).shape), fmt, x.shape)
    zero = ungrouped(packed.zero.float().expand(grouped(x, fmt).shape), fmt, x.shape)
    levels = 2**fmt.encoding.bits - 1
    return scale / 2 + 4 * 2.0**-24 * (x.abs() + zero.abs() + levels * scale) + fp32


# --------------------------------------------------------------------------------------------
# What a model caches, and the cache formats of its parts
# --------------------------------------------------------------------------------------------
# Latent encodings the paged cache stores as codes and the decode kernel dequantizes
# (`latentkv.kernels.quantized_pages.KERNEL_ENCODINGS` says how it reads each).
PAGED_LATENT_ENCODINGS = ("fp8_e4m3", "int4")
CAST_ENCODINGS = ("bf16", "fp16")  # stored rounded to the encoding, at the model dtype
STORABLE = ("latent: fp8_e4m3/g<N>, int4/g<N> (N a power of 2), fp8_e4m3/head, int4/head, bf16 or fp16; "
            "RoPE key: bf16 or fp16")


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def format_problem(fmt: KVFormat, part: str) -> str | None:
    """Why the paged cache cannot store `part` ("latent" or "rope") in `fmt`, or None."""
    name = fmt.encoding.name
    if name in CAST_ENCODINGS:
        return None
    if part != "latent":
        return f"the paged cache keeps the RoPE key at the model dtype, not {fmt.name}"
    if name not in PAGED_LATENT_ENCODINGS:
        return f"the decode kernel does not read {fmt.name}"
    if fmt.per_channel:
        return (f"{fmt.name} groups tokens (KIVI's per-channel keys); the paged cache quantizes each token as it is "
                "written")
    if fmt.grouping == "none":
        return f"{fmt.name} has no scale; give it groups ({name}/g128 or {name}/head)"
    if fmt.grouping.startswith("g") and not _pow2(fmt.group_size):
        return f"{fmt.name}: the kernel reads groups of a power-of-2 width"
    if name == "int4" and fmt.group_size == 1:
        return f"{fmt.name}: int4 groups hold at least two values (a byte)"
    return None


def check_paged_formats(formats: dict[str, KVFormat]) -> None:
    """Refuse cache formats (parts "latent" and "rope") that the paged cache cannot store."""
    for part, fmt in formats.items():
        problem = format_problem(fmt, part)
        if problem:
            raise LatentKVError(f"Cache format {part}={fmt.name}: {problem}. The paged cache stores {STORABLE}")


SOURCE_PARTS = ("keys", "values")
LATENT_PARTS = ("latent", "rope")
# transformers' modeling of these caches decompressed per-head keys and values, not what a serving
# engine stores, so a format applied there would describe neither
DECOMPRESSED_IN_TRANSFORMERS = {"deepseek_v3"}


def cache_parts(config) -> list[tuple[str, str]]:
    """Per layer, the parts in update()'s (first, second) slots."""
    model_type = getattr(config, "model_type", None)
    if model_type == "latentkv":
        return [("rope", "latent") if spec.get("kind") == "gta-s" else ("latent", "rope")
                for spec in config.attention_layers]
    if model_type in DECOMPRESSED_IN_TRANSFORMERS:
        raise LatentKVError(f"transformers' {model_type} modeling caches decompressed keys and values, not the "
                            "latent a serving engine stores; evaluate the latentkv-format output (convert without "
                            "--format deepseek) with --kv-cache")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return [SOURCE_PARTS] * int(text.num_hidden_layers)


def parse_cache_formats(spec: str, parts: tuple[str, ...], rope: str | None = None,
                        flag: str = "--kv-cache") -> dict[str, KVFormat]:
    """`--kv-cache` (and `--kv-cache-rope`) -> a format per cached part.

    spec: one FORMAT for every part, or `part=FORMAT` items joined by commas, where a bare FORMAT
    among them covers the parts not named (e.g. `int4/g32`, `keys=int2/channel32,values=int2/g32`,
    `latent=fp8_e4m3/g128,rope=bf16`). rope: the format of the RoPE key (latentkv models).
    flag: the option named in error messages.
    """
    named: dict[str, KVFormat] = {}
    default = None
    for item in filter(None, (s.strip() for s in spec.split(","))):
        part, sep, text = item.partition("=")
        if not sep:
            if default is not None:
                raise LatentKVError(f"{flag} {spec!r} gives two formats for every part; name the parts "
                                    f"({', '.join(p + '=FORMAT' for p in parts)})")
            default = parse_format(item)
            continue
        part = part.strip().lower()
        if part not in parts:
            raise LatentKVError(f"{flag} {spec!r}: this model caches {' and '.join(parts)}, not {part!r}")
        named[part] = parse_format(text)
    if rope is not None:
        if "rope" not in parts:
            raise LatentKVError("--kv-cache-rope is for latentkv models (latent + RoPE key); this model caches "
                                "keys and values: write --kv-cache keys=FORMAT,values=FORMAT")
        if "rope" in named:
            raise LatentKVError("The RoPE key's format is given twice (--kv-cache rope=... and --kv-cache-rope); keep one")
        named["rope"] = parse_format(rope)
    missing = [p for p in parts if p not in named and default is None]
    if missing:
        raise LatentKVError(f"{flag} {spec!r} gives no format for {', '.join(missing)}; add a bare FORMAT "
                            f"for the rest or {', '.join(m + '=FORMAT' for m in missing)}")
    return {p: named.get(p, default) for p in parts}


def describe_formats(formats: dict[str, KVFormat]) -> str:
    return ", ".join(f"{part}={fmt.name}" for part, fmt in formats.items())


# ---- a converted model's own cache format (`latentkv convert --cache-format`, config `kv_cache_format`)
CONFIG_KEY = "kv_cache_format"
DEFAULT_ROPE_FORMAT = "bf16"  # the RoPE key beside a quantized latent, as FlashMLA's FP8 cache keeps it


def parse_model_cache_format(spec: str) -> dict[str, KVFormat]:
    """`--cache-format` -> formats of "latent" and "rope", checked to be storable by the paged cache.
    The syntax is --kv-cache's; a bare FORMAT is the latent's, the RoPE key bf16 unless named
    (e.g. `fp8_e4m3/g128`, `latent=int4/g32,rope=bf16`)."""
    named = {item.partition("=")[0].strip().lower() for item in spec.split(",") if "=" in item}
    rope = None if "rope" in named else DEFAULT_ROPE_FORMAT
    formats = parse_cache_formats(spec, LATENT_PARTS, rope=rope, flag="--cache-format")
    check_paged_formats(formats)
    return formats


def config_cache_format(formats: dict[str, KVFormat]) -> dict[str, str]:
    """The config entry of a model's cache format: part -> format name."""
    return {part: fmt.name for part, fmt in formats.items()}


def model_cache_formats(config) -> dict[str, KVFormat] | None:
    """The cache format a converted model's config carries (None: it caches at its dtype)."""
    entry = getattr(config, CONFIG_KEY, None)
    if not entry:
        return None
    if not isinstance(entry, dict) or set(entry) != set(LATENT_PARTS):
        raise LatentKVError(f"config {CONFIG_KEY} must map {' and '.join(LATENT_PARTS)} to format names, got {entry!r}; "
                            "convert again with --cache-format")
    return {part: parse_format(str(entry[part])) for part in LATENT_PARTS}


def config_bytes_per_token(config) -> tuple[float, str] | None:
    """(KV bytes per token over every layer, the format described) of a config that carries a cache
    format, from the widths it declares; None without one. Scales and zero-points included."""
    formats = model_cache_formats(config)
    if formats is None:
        return None
    total = 0.0
    for spec in config.attention_layers:
        total += formats["latent"].bytes_per_token(1, int(spec["kv_lora_rank"]))
        total += formats["rope"].bytes_per_token(1, int(spec["rope_dim"]))  # RoPE formats are casts: no groups
    return total, describe_formats(formats)
