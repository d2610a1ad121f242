"""Token sparsity at decode: each decode step attends only to the KV blocks (cache pages) a policy
picks -- dense, window (StreamingLLM), last-step, oracle, or a learned AttentionPredictor
(Yang et al., arXiv 2502.04077). Policies: ``policies``; block masses: ``masses``; the hook the
paged cache calls: ``runtime``; the predictor model: ``predictor``; training: ``train``;
teacher-forced comparison with dense decoding: ``evaluate``; the cache in host memory with a
device page pool and prefetch of the forecast pages: ``offload``."""

from latentkv.sparsity.policies import POLICIES, SparseConfig, choose_blocks, parse_budget
from latentkv.sparsity.runtime import SparseAttention

__all__ = ["POLICIES", "SparseAttention", "SparseConfig", "choose_blocks", "parse_budget"]
