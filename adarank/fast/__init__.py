"""The GPU fast path: fused base+adapter autograd functions (fused), the same as torch.library custom ops for
torch.compile (ops), grouped siblings (siblings), Triton kernels for the thin products (kernels) and the
CUDA-graph step (graphs). Nothing here changes what is
computed, only how fast (up to rounding: the fused sums are rounded once instead of twice).

The adapter layers (adarank.layers) reach it through one call, first thing in their forward:

    y = fast.forward(layer, x)  # layer(x), or None where the fast path does not serve: the plain path runs

`inject` also calls `fast.link_siblings(model, adapters)`, and the runner uses `graphs` and
`fused.grads_into_buffers`.

The contract. The fast path reads, and never writes, these attributes of a layer:
- `fused` (bool): the switch (`inject(..., fused=True)`; a plain attribute, so it may be flipped on an
  injected model). While it is False nothing is served;
- `merged` (bool): a merged layer is served by its plain path (its base alone);
- `base`: the wrapped `nn.Linear` or transformers `Conv1D` (its `weight` and `bias`), with `transposed`
  True when the weight is stored (in, out) as Conv1D stores it;
- `dropout`: the module applied to the adapter's input, `nn.Identity` when there is none; and `training`;
- `kind` with the factors of that kind: "lora": `lora_A` (r, in), `lora_B` (out, r), ΔW = scale·B·A;
  "svd": `Q` (r, in), `P` (out, r), `lam` (r,), ΔW = P·diag(λ·scale)·Q (r may be 0 after pruning). The
  first factor's dtype is the adapter's dtype;
- `scale` (float); `in_features` (siblings are adapters of one input width).
`link_siblings` gives every layer one more attribute, `siblings` (a `siblings.Siblings` or None), which only
the fast path reads.

When it serves (else `forward` returns None and the layer computes as if `fused` were off): the layer is
`fused` and not merged; its base is frozen (the fused function gives the base no gradient) and dense (an NF4
base, adarank/quant.py, is read through torchao's own linear); and the input has the adapter's dtype or
autocast is on (the plain path computes the adapter in its own dtype). A layer is computed with its siblings'
group when they read the same tensor and no dropout is at work (dropout is `nn.Identity`, or the layer is in
eval mode); otherwise alone. While torch.compile traces, every served layer is one custom op of its own
(adarank/fast/ops.py), which the compiler keeps whole and fuses the rest of the block around.
"""

from .serve import forward
from .siblings import link_siblings

__all__ = ["forward", "link_siblings"]
