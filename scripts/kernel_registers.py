#!/usr/bin/env python
"""Registers and spills of the split decode kernel compiled for a GPU target, without a GPU.

The launcher's arguments for one shape and configuration are captured (the launch itself is not
run), the kernel is compiled ahead of time for the target (default sm_90a: H100 / H200) and ptxas
reports registers, spill stores / loads and stack bytes per thread; Triton's own figure of the
shared memory a program takes is printed beside them. Useful to check that a
configuration fits the register file before timing it on a GPU. Triton and its bundled ptxas are
needed, not a GPU; the figures come from the installed Triton, which may allocate differently from
the version on the GPU machine.

  python scripts/kernel_registers.py --width 960+64 --rows 32 --config 32,16,8,3
  python scripts/kernel_registers.py --width 960+64 --rows 32 --config 32,16,8,3 --config 32,16,8,3,out_splits=2
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib  # noqa: E402

import torch  # noqa: E402

md = importlib.import_module("latentkv.kernels.mla_decode")

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
           torch.uint8: "u8", torch.int64: "i64"}


class _Capture:
    """Stands in for a jitted kernel: ``kernel[grid](*args, **kw)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))

        return launch


def parse_config(text: str) -> md.DecodeConfig:
    """"block_m,block_n,num_warps,num_stages[,field=value...]" -> DecodeConfig."""
    parts = text.split(",")
    fields = dict(zip(("block_m", "block_n", "num_warps", "num_stages"), (int(p) for p in parts[:4])))
    for extra in parts[4:]:
        k, v = extra.split("=")
        fields[k] = v == "True" if v in ("True", "False") else (int(v) if v.lstrip("-").isdigit() else v)
    return md.DecodeConfig(**fields)


def capture(width: str, rows: int, cfg: md.DecodeConfig, *, dtype, splits: int, latent_heads: int, sq: int,
            page: int, kv_format: str | None):
    r_c, rope = (int(x) for x in width.split("+"))
    heads = rows * latent_heads // sq
    n_pages = 4
    kv = torch.zeros(n_pages, page, latent_heads * r_c + rope, dtype=dtype)
    if kv_format:
        from latentkv.kernels.quantized_pages import QuantizedPages
        from latentkv.kvformats import parse_format

        kv = QuantizedPages.empty(parse_format(kv_format), num_pages=n_pages, page_size=page,
                                  latent_width=latent_heads * r_c, rope_dim=rope, dtype=dtype, device="cpu")
    q = torch.zeros(1, sq, heads, r_c + rope, dtype=dtype)
    table = torch.arange(n_pages, dtype=torch.int32)[None]
    lens = torch.tensor([n_pages * page], dtype=torch.int32)
    md._kernels()
    saved = dict(md._JIT)
    split, combine = _Capture(), _Capture()
    md._JIT["split"], md._JIT["combine"] = split, combine
    # triton is imported (compiled mode) by now; the launcher reads TRITON_INTERPRET per call and
    # then accepts CPU tensors: the launch is captured, not run
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        md.mla_decode(q, kv, table, lens, latent_heads=latent_heads, rope_dim=rope, softmax_scale=0.1,
                      num_splits=splits, config=cfg)
    finally:
        md._JIT.update(saved)
        del os.environ["TRITON_INTERPRET"]
    return split.calls[-1]


def compile_ptx(call, cfg: md.DecodeConfig, arch: int) -> str:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    _, args, kw = call
    kw = dict(kw, UPCAST_DOT=False)
    options = {k: kw.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kw}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    fn = JITFunction(md._mla_decode_split_kernel)
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i < len(args):
            v = args[i]
        elif name in kw:
            v = kw[name]
        else:
            v = fn.params[i].default
            sig[name] = "constexpr"
            consts[name] = v
            continue
        if fn.params[i].is_constexpr:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _DTYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, int):
            if v == 1:  # the JIT specializes 1 as a constant
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"argument {name}: {type(v).__name__}")
    src = ASTSource(fn, sig, consts, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return compiled.asm["ptx"], options, compiled.metadata.shared


def ptxas_usage(ptx: str, arch: int, maxnreg: int | None) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "k.ptx"
        path.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(path), "-o", str(Path(d) / "k.cubin")]
        if maxnreg:
            cmd.insert(2, f"--maxrregcount={maxnreg}")
        text = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    smem = re.search(r"(\d+) bytes smem", text)
    return dict(regs=int(regs.group(1)) if regs else None, spill_stores=int(stores.group(1)) if stores else None,
                spill_loads=int(loads.group(1)) if loads else None, stack=int(stack.group(1)) if stack else None,
                smem=int(smem.group(1)) if smem else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", default="960+64", help="LATENT+ROPE of one latent head")
    p.add_argument("--rows", type=int, default=32, help="query rows per latent head")
    p.add_argument("--config", action="append", default=None,
                   help="block_m,block_n,num_warps,num_stages[,field=value]; repeatable (default: default_config's rules)")
    p.add_argument("--splits", type=int, default=2, help="KV splits (1 compiles the direct-write variant)")
    p.add_argument("--latent-heads", type=int, default=1)
    p.add_argument("--query-len", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--kv-format", default=None, help="a quantized latent, e.g. fp8_e4m3/g128")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    r_c, rope = (int(x) for x in args.width.split("+"))
    kv_quant = ""
    if args.kv_format:
        from latentkv.kernels.quantized_pages import KERNEL_ENCODINGS
        from latentkv.kvformats import parse_format

        kv_quant = KERNEL_ENCODINGS[parse_format(args.kv_format).encoding.name].switch
    configs = [parse_config(c) for c in args.config] if args.config else [
        md.default_config(args.rows, r_c, rope, dtype, kv_quant=kv_quant)]
    for cfg in configs:
        call = capture(args.width, args.rows, cfg, dtype=dtype, splits=args.splits, latent_heads=args.latent_heads,
                       sq=args.query_len, page=args.page_size, kv_format=args.kv_format)
        ptx, options, shared = compile_ptx(call, cfg, args.arch)
        u = ptxas_usage(ptx, args.arch, options.get("maxnreg"))
        print(f"{args.width} rows {args.rows} {cfg}: regs {u['regs']}, spill stores {u['spill_stores']} B, "
              f"spill loads {u['spill_loads']} B, stack {u['stack']} B, shared memory {shared} B (an H100 program "
              f"may use 232448)", flush=True)


if __name__ == "__main__":
    main()
