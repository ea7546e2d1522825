"""A/B of adapted-linear implementations on W2's layer shapes, replayed as one CUDA graph.

    python experiments/bench/layer_ab.py [--out FILE.json] [--reps 30] [--profile DIR]

Builds the 154 adapted matrices of W2 (22 blocks x q, k, v, o, gate, up, down; hidden 2048, kv 256,
intermediate 5632) on 8 x 1024 tokens, with frozen bf16 base weights and fp32 adapters under bf16 autocast,
as `bench.py` does. One "step" is the forward of every matrix, then one backward from fixed output gradients
into the inputs and the adapters' persistent gradients. Each implementation's step is captured as a CUDA
graph and replayed; the median replay time of each is reported in one process on one GPU, with "base" (the
frozen linears alone) as the floor. Implementations are interleaved round by round, so drift affects all alike.

It isolates the adapter's matmuls and per-layer kernels from the rest of the model: attention, norms and the
optimizer are not in it. `bench.py` measures the whole step.

Implementations (`--impls`): base; unfused (the default layers' computation: base, two thin matmuls, an add);
fused (adarank/fused.py as it is); prev, swap, lean, swap_lean (`_Cand`: the fused layer of commit ec6eade and
the two changes that replaced it, alone and together). `rel_grad_diff_vs_unfused` is the largest difference
between an implementation's gradients and the unfused ones (x's and the first adapters' parameters'), relative
to that tensor's largest entry. In results/bench/layer_ab_w2.json it is the same for the previous and the new
fused layer (5.4% LoRA, 3.9% SVD); which tensor sets it was not recorded (x.grad is bf16 and sums the
contributions of 132 matrices, the likeliest).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from adarank import fused

H, KV, I, BLOCKS, TOKENS = 2048, 256, 5632, 22, 8 * 1024
SHAPES = [(H, H), (H, KV), (H, KV), (H, H), (H, I), (H, I), (I, H)]  # (in, out) per target type


def make_layers(kind: str, r: int, dev: torch.device) -> list[dict]:
    layers = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for _ in range(BLOCKS):
        for d_in, d_out in SHAPES:
            w = (torch.randn(d_out, d_in, generator=g) * 0.02).to(dev, torch.bfloat16)
            p1 = torch.nn.Parameter((torch.randn(r, d_in, generator=g) * 0.02).to(dev))
            p2 = torch.nn.Parameter((torch.randn(d_out, r, generator=g) * 0.02).to(dev))
            lam = torch.nn.Parameter((torch.randn(r, generator=g) * 0.1).to(dev)) if kind == "svd" else None
            layers.append({"w": w, "p1": p1, "p2": p2, "lam": lam, "d_in": d_in, "d_out": d_out})
    return layers


def params(layers: list[dict]) -> list[torch.nn.Parameter]:
    return [p for L in layers for p in (L["p1"], L["p2"], L["lam"]) if p is not None]


def step_fn(impl: str, kind: str, layers: list[dict], x: torch.Tensor, x2: torch.Tensor, gys: list[torch.Tensor]):
    scale = 2.0

    def step():
        ys = []
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            for L in layers:
                inp = x if L["d_in"] == H else x2
                if impl == "base":
                    ys.append(F.linear(inp, L["w"]))
                elif impl == "unfused":
                    y = F.linear(inp, L["w"])
                    if kind == "lora":
                        d = F.linear(F.linear(inp, L["p1"]), L["p2"] * scale)
                    else:
                        d = F.linear(F.linear(inp, L["p1"] * (L["lam"] * scale)[:, None]), L["p2"])
                    ys.append(y + d)
                else:
                    ys.append(IMPLS[impl](inp, inp, L["w"], None, kind, L["p1"], L["p2"], L["lam"], scale))
        torch.autograd.backward(ys, gys)

    return step


def _pad_rank(m: torch.Tensor, dim: int) -> torch.Tensor:
    pad = -m.shape[dim] % fused.ALIGN
    return m if pad == 0 else F.pad(m, (0, pad) if dim == 1 else (0, 0, 0, pad))


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
    fused layer of commit ec6eade; (True, True) is what adarank/fused.py became."""

    @staticmethod
    def forward(ctx, x, h, weight, bias, p1, p2, lam, kind, scale, swap, lean):
        out = weight.shape[0]
        x2, h2 = x.reshape(-1, x.shape[-1]), h.reshape(-1, h.shape[-1])
        if lean:
            a, b, v = fused._factors(kind, p1, p2, lam, scale, x.dtype)
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
    ap.add_argument("--impls", default="base,unfused," + ",".join(IMPLS))
    args = ap.parse_args()
    dev = torch.device("cuda")
    impls = args.impls.split(",")
    res: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS,
                 "matrices": BLOCKS * len(SHAPES), "ms": {}}
    for kind, r in (("lora", 8), ("svd", 12)):
        layers = make_layers(kind, r, dev)
        ps = params(layers)
        x = torch.randn(TOKENS, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
        x2 = torch.randn(TOKENS, I, device=dev, dtype=torch.bfloat16, requires_grad=True)
        gys = [torch.randn(TOKENS, L["d_out"], device=dev, dtype=torch.bfloat16) * 1e-3 for L in layers]
        graphs, grads_of = {}, {}
        for p in ps + [x, x2]:  # persistent gradient buffers: every graph accumulates into them
            p.grad = torch.zeros_like(p)
        for impl in impls:
            fn = step_fn(impl, kind, layers, x, x2, gys)
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
            for p in ps + [x, x2]:
                p.grad.zero_()
            g.replay()
            torch.cuda.synchronize()
            grads_of[impl] = [p.grad.float().clone() for p in ps[:6]] + [x.grad.float().clone()]
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
