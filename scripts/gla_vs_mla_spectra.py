"""Why GLA-3 trails MLA on SmolLM2 at the same KV width: a GLA latent head serves one KV group, so its
up-projection is block-diagonal over the groups and it cannot use what one group's keys and values
share with another's; MLA's one latent can. This measures that share on real activations: per layer,
the covariance of [K; V] (pre-RoPE, keys and values balanced to equal energy) over 128 x 256 tokens of
the shipped Gutenberg books, and the fraction of it the best rank-r subspace keeps, jointly (MLA) or as 3 blocks of r/3
(GLA-3). RoPE is left out (both formats share the same RoPE key), so this isolates the latent.

    python scripts/gla_vs_mla_spectra.py      # CPU, about a minute or two; benchmarks/gla_spectra_cpu.md
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, AutoTokenizer
from latentkv.data import CALIBRATION_TEXT, read_text
from latentkv.io.assets import smollm2_folder
if any(a in ("-h", "--help") for a in sys.argv[1:]):
    print(__doc__)
    raise SystemExit(0)
src = smollm2_folder()
tok = AutoTokenizer.from_pretrained(src); model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
text = "".join(read_text(f, errors="replace") for f in sorted(CALIBRATION_TEXT.glob("*.txt.gz")))
ids = tok(text[:3_000_000], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
g = torch.Generator().manual_seed(0)
starts = torch.randint(0, ids.numel() - 257, (128,), generator=g)
batch = torch.stack([ids[s:s + 256] for s in starts])
L = model.config.num_hidden_layers
cov = [torch.zeros(384, 384, dtype=torch.float64) for _ in range(L)]
acts = {}
def hook(i, name):
    def f(m, inp, out): acts[(i, name)] = out.detach().reshape(-1, out.shape[-1]).double()
    return f
for i, layer in enumerate(model.model.layers):
    layer.self_attn.k_proj.register_forward_hook(hook(i, "k")); layer.self_attn.v_proj.register_forward_hook(hook(i, "v"))
with torch.no_grad():
    for b in batch.split(16):
        model(b, use_cache=False)
        for i in range(L):
            k, v = acts[(i, "k")], acts[(i, "v")]
            # balance keys and values (equal total energy), group-major layout [k_g; v_g] per group
            kv = torch.cat([torch.cat([k[:, 64*h:64*h+64], v[:, 64*h:64*h+64]], 1) for h in range(3)], 1)
            cov[i] += kv.T @ kv
rows = []
for r in (96, 144, 192):
    joint, block = [], []
    for i in range(L):
        C = cov[i].clone()
        # balance: scale the key and value coordinates so each has half the trace
        idx_k = torch.cat([torch.arange(128*h, 128*h+64) for h in range(3)]); idx_v = idx_k + 64
        sk, sv = C[idx_k, idx_k].sum(), C[idx_v, idx_v].sum()
        d = torch.ones(384, dtype=torch.float64); d[idx_k] = sk.rsqrt(); d[idx_v] = sv.rsqrt()
        C = d[:, None] * C * d[None, :]
        tr = C.trace()
        ev = torch.linalg.eigvalsh(C).flip(0)
        joint.append(float(ev[:r].sum() / tr))
        block.append(float(sum(torch.linalg.eigvalsh(C[128*h:128*h+128, 128*h:128*h+128]).flip(0)[: r // 3].sum() for h in range(3)) / tr))
    jm, bm = sum(joint) / L, sum(block) / L
    rows.append((r, jm, bm))
    print(f"rank {r} ({r/384:.0%} of 384): joint (MLA) keeps {jm:.4f} of the balanced K/V energy, 3 groups of {r//3} (GLA-3) keep {bm:.4f}; "
          f"lost: {1-jm:.4f} vs {1-bm:.4f} ({(1-bm)/(1-jm):.2f}x)")
