"""A/B of adapted-linear implementations on a workload's layer shapes, replayed as one CUDA graph.

    python experiments/bench/layer_ab.py [--workload W2|W3] [--impls ...] [--out FILE.json] [--reps 30] [--profile DIR]

Builds the adapted matrices of bench.py's W2 (22 blocks; hidden 2048, kv 256, intermediate 5632) or W3 (80 blocks;
hidden 1024, kv 256, intermediate 2816), each block's q, k, v, o, gate, up and down, on 8 x 1024 tokens, with
frozen bf16 base weights and fp32 adapters under bf16 autocast, as `bench.py` does. Each block has four input
tensors, as in the model: q, k and v read one, o another, gate and up a third, down the fourth. One "step" is the
forward of every matrix, then one backward from fixed output gradients into the inputs and the adapters'
persistent gradients. Each implementation's step is captured as a CUDA graph and replayed; the median replay
time of each is reported in one process on one GPU, with "base" (the frozen linears alone) as the floor.
Implementations are interleaved round by round, so drift affects all alike.

It isolates the adapters' matmuls and per-layer kernels from the rest of the model: attention, norms and the
optimizer are not in it. `bench.py` measures the whole step.

Implementations (`--impls`):
- base; unfused (the default layers' computation: base, two thin matmuls, an add);
- fused: adarank/fast/fused.py one matrix at a time (`adapted_linear`), gradients handed to autograd;
- grouped: q, k, v and gate, up each as one `adapted_linears` call, as adarank/fast/siblings.py groups them;
- fused_into, grouped_into: the same inside `grads_into_buffers()`, as the CUDA-graph step runs them (the
  gradients accumulate in the GEMMs);
- any of the fused ones with the suffix `_cublas`: adarank/fast/kernels.py switched off, so the thin products
  run as cuBLAS GEMMs (as before those kernels existed);
- prev, swap, lean, swap_lean (`_Cand`): the fused layer of commit ec6eade and the two changes that replaced it
  at commit b882deb, alone and together (the record of attempt 5).
`rel_grad_diff_vs_unfused` is the largest difference between an implementation's gradients and the unfused ones
(the first adapters' parameters' and the first block's inputs'), relative to that tensor's largest entry.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from adarank.fast import fused, kernels

#: (hidden, kv width, intermediate, blocks) of bench.py's Llama workloads
SHAPES_OF = {"W2": (2048, 256, 5632, 22), "W3": (1024, 256, 2816, 80)}
TOKENS = 8 * 1024
#: the seven target types: (name, which of the block's inputs it reads, in width, out width) as functions of
#: (H, KV, I); q, k and v read the attention's input, gate and up the MLP's, as in the model
TYPES = [("q", "attn"), ("k", "attn"), ("v", "attn"), ("o", "o"), ("gate", "mlp"), ("up", "mlp"), ("down", "down")]


def dims(target: str, H: int, KV: int, I: int) -> tuple[int, int]:
    """(in, out) width of a target type, from (hidden, kv width, intermediate)."""
    return {"q": (H, H), "k": (H, KV), "v": (H, KV), "o": (H, H), "gate": (H, I), "up": (H, I), "down": (I, H)}[target]


def make_layers(kind: str, r: int, dev: torch.device, shapes: tuple[int, int, int, int]) -> list[dict]:
    H, KV, I, blocks = shapes
    layers = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for blk in range(blocks):
        for t, src in TYPES:
            d_in, d_out = dims(t, H, KV, I)
            w = (torch.randn(d_out, d_in, generator=g) * 0.02).to(dev, torch.bfloat16)
            p1 = torch.nn.Parameter((torch.randn(r, d_in, generator=g) * 0.02).to(dev))
            p2 = torch.nn.Parameter((torch.randn(d_out, r, generator=g) * 0.02).to(dev))
            lam = torch.nn.Parameter((torch.randn(r, generator=g) * 0.1).to(dev)) if kind == "svd" else None
            layers.append({"w": w, "p1": p1, "p2": p2, "lam": lam, "d_in": d_in, "d_out": d_out, "blk": blk, "src": src})
    return layers


def make_inputs(dev: torch.device, shapes: tuple[int, int, int, int]) -> list[dict[str, torch.Tensor]]:
    """Per block, the four tensors its matrices read (leaves, so backward writes their gradients)."""
    H, _, I, blocks = shapes
    return [{src: torch.randn(TOKENS, I if src == "down" else H, device=dev, dtype=torch.bfloat16, requires_grad=True)
             for src in ("attn", "o", "mlp", "down")} for _ in range(blocks)]


def params(layers: list[dict]) -> list[torch.nn.Parameter]:
    return [p for L in layers for p in (L["p1"], L["p2"], L["lam"]) if p is not None]


def step_fn(impl: str, kind: str, layers: list[dict], xs: list[dict[str, torch.Tensor]], gys: list[torch.Tensor]):
    scale = 2.0
    cublas = impl.endswith("_cublas")
    impl = impl.removesuffix("_cublas")
    grouped = impl.startswith("grouped")
    into = impl.endswith("_into")

    def one(L):
        inp = xs[L["blk"]][L["src"]]
        if impl == "base":
            return F.linear(inp, L["w"])
        if impl == "unfused":
            y = F.linear(inp, L["w"])
            if kind == "lora":
                d = F.linear(F.linear(inp, L["p1"]), L["p2"] * scale)
            else:
                d = F.linear(F.linear(inp, L["p1"] * (L["lam"] * scale)[:, None]), L["p2"])
            return y + d
        fn = IMPLS.get(impl, fused.adapted_linear)
        return fn(inp, inp, L["w"], None, kind, L["p1"], L["p2"], L["lam"], scale)

    def step():
        ys = []
        kernels.enabled = not cublas
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
            if into:
                stack.enter_context(fused.grads_into_buffers())
            i = 0
            while i < len(layers):
                L = layers[i]
                members = [M for M in layers[i:i + 3] if M["blk"] == L["blk"] and M["src"] == L["src"]]
                if grouped and len(members) > 1:
                    inp = xs[L["blk"]][L["src"]]
                    ads = [fused.Adapter(M["w"], None, kind, M["p1"], M["p2"], M["lam"], scale) for M in members]
                    ys += fused.adapted_linears(inp, inp, ads)
                    i += len(members)
                else:
                    ys.append(one(L))
                    i += 1
        torch.autograd.backward(ys, gys)
        kernels.enabled = True

    return step


def _pad_rank(m: torch.Tensor, dim: int) -> torch.Tensor:
    pad = -m.shape[dim] % fused.ALIGN
    return m if pad == 0 else F.pad(m, (0, pad) if dim == 1 else (0, 0, 0, pad))


def _lean_factors(kind, p1, p2, lam, scale, dt):
    """The factor preparation of adarank/fast/fused.py: (a, b, v), one kernel per factor (cast and scale in
    one), the rank padded to ALIGN."""
    r = p1.shape[0]
    rp = fused._padded(r)
    a = p1.new_empty((rp, p1.shape[1]), dtype=dt)
    if rp != r:
        a[r:].zero_()
    v = fused._a_factor(kind, p1, lam, scale, a)
    return a, fused._b_factor(kind, p2, scale, dt, rp), v


def _old_factors(kind, p1, p2, lam, scale, dt):
    """The preparation of commit ec6eade's fused layer: separate scale, cast and pad kernels."""
    if kind == "lora":
        a, b = p1.to(dt), (p2 * scale).to(dt)
    else:
        a, b = (p1 * (lam * scale)[:, None]).to(dt), p2.to(dt)
    return _pad_rank(a, 0), _pad_rank(b, 1)


class _Cand(torch.autograd.Function):
    """The fused layer's candidates: swap = thin matmul first, base matmul adds itself in its epilogue
    (else the base first, then an accumulating thin matmul); lean = one kernel per factor and fp32
    gradients straight from the GEMM (else separate cast, scale and pad kernels). (False, False) is the
    fused layer of commit ec6eade; (True, True) is what adarank/fast/fused.py became."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, p1, p2, lam, kind, scale, swap, lean):
        out = weight.shape[0]
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        if lean:
            a, b, v = _lean_factors(kind, p1, p2, lam, scale, x.dtype)
        else:
            (a, b), v = _old_factors(kind, p1, p2, lam, scale, x.dtype), (lam * scale if lam is not None else None)
        t = torch.mm(h2, a.t())
        if swap:
            y = torch.mm(t, b.t()) if bias is None else torch.addmm(bias, t, b.t())
            y.addmm_(x2, weight.t())
        else:
            y = F.linear(x2, weight, bias)
            y.addmm_(t, b.t())
        ctx.k = (h is x, kind, scale, p1.shape[0], p2.dtype, swap, lean)
        ctx.save_for_backward(h, weight, a, b, t, p1, v)
        return y.view(*x.shape[:-1], out)

    @staticmethod
    def backward(ctx, grad_y):
        h, weight, a, b, t, p1, v = ctx.saved_tensors
        _same, kind, scale, r, p2_dtype, swap, lean = ctx.k
        g = grad_y.reshape(-1, weight.shape[0])
        h2 = h.reshape(-1, h.shape[-1])
        u = g @ b
        gp1 = gp2 = glam = None
        if lean:
            ga = fused._mm(u.t(), h2, torch.float32)[:r]
            if kind == "lora":
                gp1 = ga
                gp2 = fused._mm(g.t(), t, torch.float32, scale)[:, :r]
            else:
                gp1 = ga * v[:, None]
                glam = torch.linalg.vecdot(ga, p1) * scale
                gp2 = fused._mm(g.t(), t, torch.float32)[:, :r]
        else:
            ga = (u.t() @ h2)[:r].to(p1.dtype)
            gb = (g.t() @ t)[:, :r].to(p2_dtype)
            if kind == "lora":
                gp1, gp2 = ga, gb * scale
            else:
                gp1, glam, gp2 = ga * v[:, None], (ga * p1).sum(1) * scale, gb
        if swap:
            gx = torch.mm(u, a)
            gx.addmm_(g, weight)
        else:
            gx = (g @ weight).addmm_(u, a)
        return gx.view(*grad_y.shape[:-1], -1), None, None, None, gp1, gp2, glam, None, None, None, None


def _cand(swap, lean):
    def f(x, h, weight, bias, kind, p1, p2, lam, scale):
        with torch.autocast("cuda", enabled=False):
            x = x.to(torch.bfloat16)
            return _Cand.apply(x, x, weight, bias, p1, p2, lam, kind, scale, swap, lean)
    return f


IMPLS = {"fused": fused.adapted_linear, "prev": _cand(False, False), "swap": _cand(True, False),
         "lean": _cand(False, True), "swap_lean": _cand(True, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile")
    ap.add_argument("--impls", default="base,unfused,fused,grouped,fused_into,grouped_into")
    ap.add_argument("--workload", choices=sorted(SHAPES_OF), default="W2")
    args = ap.parse_args()
    dev = torch.device("cuda")
    impls = args.impls.split(",")
    shapes = SHAPES_OF[args.workload]
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "workload": args.workload,
                 "tokens": TOKENS, "matrices": shapes[3] * len(TYPES), "ms": {}}
    for kind, r in (("lora", 8), ("svd", 12)):
        layers = make_layers(kind, r, dev, shapes)
        ps = params(layers)
        xs = make_inputs(dev, shapes)
        leaves = [t for d in xs for t in d.values()]
        gys = [torch.randn(TOKENS, L["d_out"], device=dev, dtype=torch.bfloat16) * 1e-3 for L in layers]
        graphs, grads_of = {}, {}
        for p in ps + leaves:  # persistent gradient buffers: every graph accumulates into them
            p.grad = torch.zeros_like(p)
        for impl in impls:
            fn = step_fn(impl, kind, layers, xs, gys)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            for p in ps + leaves:
                p.grad.zero_()
            g.replay()
            torch.cuda.synchronize()
            grads_of[impl] = [p.grad.float().clone() for p in ps[:9]] + [t.grad.float().clone() for t in leaves[:4]]
            graphs[impl] = g
        ref = grads_of.get("unfused")
        check = {}
        if ref is not None:
            for impl, gl in grads_of.items():
                if impl == "base":
                    continue
                check[impl] = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(gl, ref))
        times: dict[str, list[float]] = {i: [] for i in impls}
        for _ in range(args.rounds):
            for impl in impls:
                g = graphs[impl]
                for _ in range(3):
                    g.replay()
                ev = [torch.cuda.Event(enable_timing=True) for _ in range(args.reps + 1)]
                ev[0].record()
                for k in range(args.reps):
                    g.replay()
                    ev[k + 1].record()
                torch.cuda.synchronize()
                times[impl] += [ev[k].elapsed_time(ev[k + 1]) for k in range(args.reps)]
        med = {i: statistics.median(t) for i, t in times.items()}
        res["ms"][kind] = {i: {"median": round(med[i], 3), "p10": round(sorted(times[i])[len(times[i]) // 10], 3),
                               "p90": round(sorted(times[i])[9 * len(times[i]) // 10], 3),
                               "over_base": round(med[i] - med["base"], 3) if "base" in med else None,
                               "rel_grad_diff_vs_unfused": check.get(i)} for i in impls}
        print(kind, json.dumps(res["ms"][kind], indent=1), flush=True)
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            from torch.profiler import ProfilerActivity, profile
            for impl in impls:
                if impl == "base":
                    continue
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    graphs[impl].replay()
                    torch.cuda.synchronize()
                tab = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90)
                with open(os.path.join(args.profile, f"layer_ab_{kind}_{impl}.txt"), "w") as f:
                    f.write(tab)
        del graphs, layers, ps
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
