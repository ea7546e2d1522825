"""The GPU fast path: fused base+adapter autograd functions (fused), grouped siblings (siblings), Triton
kernels for the thin products (kernels) and the CUDA-graph step (graphs). The adapter layers reach it through
one call, `fast.forward`; the runner uses `graphs`. Nothing here changes what is computed, only how fast."""
