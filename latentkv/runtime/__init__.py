"""Serving a converted model with its own cache: the paged latent cache, the decode loop and its
CUDA-graph step, and greedy generation (`latentkv.runtime.decode`). Validation of this loop lives in
`latentkv.eval.decode_check`; sparse decode (`latentkv.sparsity`) builds on it."""
