"""A paged latent cache stored quantized: what the decode kernel reads and dequantizes itself.

One layer's pages are three tensors, indexed by the same block table:

    codes   [num_pages, page_size, code_bytes]  uint8: the latent's codes, one row per token
            (float8 E4M3 bit patterns, or int4 codes two to a byte, lowest nibble first)
    scales  [num_pages, page_size, groups, fields]  fp8: a float32 scale per group (fields 1);
            int4: a float16 scale and zero-point per group (fields 2)
    rope    [num_pages, page_size, rope_dim]  the RoPE key at the model dtype

The formats and their arithmetic are `latentkv.kvformats`' (the latent cached as one head of
width r): fp8_e4m3 with /g<N>, /head or /token (amax / 448 per group, FlashMLA's scaling) and int4
with the same groupings (asymmetric, KIVI's scale and zero-point). A FlashMLA row at r = 512, d_R =
64, g128 holds 512 + 4 x 4 + 64 x 2 = 656 bytes; here they are the same bytes in three tensors: each
part is then a plain typed array that the kernel loads with aligned vector loads (a packed row
would put float32 scales at byte offsets of a uint8 row), and the RoPE key stays a tensor of the
model dtype that the kernel's unquantized RoPE path reads unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentkv.errors import LatentKVError
from latentkv.kvformats import KVFormat, Packed, check_paged_formats, dequantize, quantize


@dataclass(frozen=True)
class KernelEncoding:
    """How the decode kernel reads one latent encoding."""

    switch: str  # the kernel's KV_QUANT constexpr
    values_per_byte: int
    scale_dtype: torch.dtype
    scale_fields: int  # per group: scale (and zero-point)


KERNEL_ENCODINGS = {
    "fp8_e4m3": KernelEncoding("fp8", 1, torch.float32, 1),
    "int4": KernelEncoding("int4", 2, torch.float16, 2),
}
def group_width(fmt: KVFormat, latent_width: int) -> int:
    """Values per scale group of a latent cached as one head (/head and /token: the whole latent)."""
    return fmt.group_size if fmt.grouping.startswith("g") else latent_width


def check_groups(fmt: KVFormat, latent_width: int, latent_heads: int) -> None:
    """Refuse groups the kernel cannot read per latent head: a group straddling two GLA latent heads,
    or an int4 byte that would."""
    n, r_c = group_width(fmt, latent_width), latent_width // latent_heads
    if latent_heads > 1 and n < latent_width and r_c % n:
        raise LatentKVError(f"Cache format latent={fmt.name}: groups of {n} straddle the {latent_heads} latent heads "
                            f"of {r_c}; use g<N> with N dividing {r_c}, or /head")
    if latent_heads > 1 and r_c % KERNEL_ENCODINGS[fmt.encoding.name].values_per_byte:
        raise LatentKVError(f"Cache format latent={fmt.name}: latent heads of {r_c} split a byte of codes; use fp8_e4m3")


def kernel_groups(fmt: KVFormat, latent_width: int, latent_heads: int, block_r: int) -> tuple[int, int, int]:
    """(GROUP, NUM_GROUPS, SCALE_OFF) of the kernel for a latent of `latent_width` split into
    `latent_heads` heads: a tile of BLOCK_R columns of one latent head is NUM_GROUPS groups of GROUP
    columns, and latent head c's first group is group c * SCALE_OFF of the token."""
    check_groups(fmt, latent_width, latent_heads)
    n, r_c = group_width(fmt, latent_width), latent_width // latent_heads
    if n >= latent_width:
        return block_r, 1, 0
    # n divides r_c (GLA) or one latent head (MLA: a shorter last group, columns past r_c masked)
    return n, block_r // n, r_c // n if r_c % n == 0 else 0


@dataclass
class QuantizedPages:
    """One layer's paged latent cache in a quantized format (see the module docstring); indexing by
    page numbers gives those pages dequantized, [pages, page_size, latent_width + rope_dim] in the
    model dtype, as the kernel sees them."""

    fmt: KVFormat
    codes: torch.Tensor
    scales: torch.Tensor
    rope: torch.Tensor
    latent_width: int

    @classmethod
    def empty(cls, fmt: KVFormat, *, num_pages: int, page_size: int, latent_width: int, rope_dim: int,
              dtype: torch.dtype, device) -> QuantizedPages:
        check_paged_formats({"latent": fmt})
        kind = KERNEL_ENCODINGS[fmt.encoding.name]
        if latent_width % kind.values_per_byte:
            raise LatentKVError(f"{fmt.name} packs {kind.values_per_byte} values a byte; the latent width {latent_width} "
                                "is odd")
        groups = int(fmt.groups_per_token(1, latent_width))
        shape = (num_pages, page_size)
        return cls(
            fmt,
            torch.zeros(*shape, latent_width // kind.values_per_byte, dtype=torch.uint8, device=device),
            torch.zeros(*shape, groups, kind.scale_fields, dtype=kind.scale_dtype, device=device),
            torch.zeros(*shape, rope_dim, dtype=dtype, device=device),
            latent_width,
        )

    @property
    def kernel(self) -> KernelEncoding:
        return KERNEL_ENCODINGS[self.fmt.encoding.name]

    # the tensor interface the decode functions' checks read
    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.rope.shape[:2], self.latent_width + self.rope.shape[2]))

    @property
    def dtype(self) -> torch.dtype:
        return self.rope.dtype

    @property
    def device(self) -> torch.device:
        return self.rope.device

    def dim(self) -> int:
        return 3

    def bytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in (self.codes, self.scales, self.rope))

    def write_rows(self, flat_rows: torch.Tensor, rows: torch.Tensor) -> None:
        """Store rows [n, latent_width + rope_dim] at flat token slots `flat_rows` [n] (page * page_size
        + offset): the latent quantized (no host sync, so a CUDA graph can capture it), the RoPE key cast."""
        n, r = rows.shape[0], self.latent_width
        packed = quantize(rows[None, None, :, :r], self.fmt, checked=False)
        codes = packed.codes.reshape(n, -1).view(torch.uint8)
        fields = [packed.scale] + ([packed.zero] if packed.zero is not None else [])
        scales = torch.stack([f.reshape(n, -1) for f in fields], dim=-1).to(self.scales.dtype)
        self.codes.view(-1, codes.shape[-1]).index_copy_(0, flat_rows, codes)
        self.scales.view(-1, *self.scales.shape[2:]).index_copy_(0, flat_rows, scales)
        if self.rope.shape[-1]:
            self.rope.view(-1, self.rope.shape[-1]).index_copy_(0, flat_rows, rows[:, r:].to(self.rope.dtype))

    def __getitem__(self, pages) -> torch.Tensor:
        codes, scales, rope = self.codes[pages], self.scales[pages], self.rope[pages]
        lead, r = codes.shape[:-1], self.latent_width
        tokens = codes[..., 0].numel()
        if self.fmt.encoding.kind == "fp8":
            codes = codes.view(torch.float8_e4m3fn)
        groups = scales.shape[-2]
        field = lambda i: scales[..., i].reshape(1, 1, tokens, groups, 1)  # noqa: E731  # as `grouped` lays groups
        packed = Packed(self.fmt, torch.Size((1, 1, tokens, r)), codes.reshape(1, tokens, -1), field(0),
                        field(1) if scales.shape[-1] > 1 else None)
        latent = dequantize(packed, self.dtype).reshape(*lead, r)
        return torch.cat([latent, rope], dim=-1)
