"""CUDA-graph replay of the training step (adarank/graphs.py).

The learning-rate binding runs anywhere. The replay itself needs a GPU: those tests are skipped on a
CPU-only machine (CI) and run on the GPU machine (`python -m pytest tests/test_graphs.py`). They train a
tiny model with the eager loop and with the graphed one, and compare every parameter after each step.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import BERT_TARGETS, make_batch, tiny_bert

import adarank
from adarank.fast.graphs import GraphedStep, bind_lr, sync_lr
from adarank.orth import OrthGrad

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_bind_lr_puts_a_tensor_in_every_group_and_sync_lr_follows_the_scheduler():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    lrs = bind_lr(opt)
    t = lrs[0]
    assert opt.param_groups[0]["lr"] is t and t.item() == pytest.approx(0.1)
    for step in range(1, 4):
        sched.step()
        sync_lr(opt, lrs)
        assert opt.param_groups[0]["lr"] is t  # the same tensor a captured step reads
        assert t.item() == pytest.approx(0.1 / (step + 1))


def test_sync_lr_restores_the_tensor_when_a_float_was_assigned():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.5)
    lrs = bind_lr(opt)
    opt.param_groups[0]["lr"] = 0.25  # what older schedulers do
    sync_lr(opt, lrs)
    assert opt.param_groups[0]["lr"] is lrs[0] and lrs[0].item() == 0.25


def test_graphed_step_refuses_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="train.cuda_graph"):
        GraphedStep(lambda b: torch.zeros(()), lambda: None, [])


# ---- on a GPU ---------------------------------------------------------------------------------------
def _rig(graphed: bool, dev: torch.device, fused: bool = False):
    """Tiny BERT with SVD adapters, allocator, orth gradient, clipping, capturable fused AdamW with a
    decaying tensor lr: everything train.py's graphed step holds."""
    model = tiny_bert(layers=2).to(dev).train()
    adarank.inject(model, "svd", r=4, alpha=4.0, targets=BERT_TARGETS, fused=fused)
    named = adarank.svd_adapters(model)
    layers = [m for _, m in named]
    for m in layers:  # λ = 0 at init gives P and Q no gradient; start from a non-zero λ
        torch.nn.init.normal_(m.lam, std=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True, capturable=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 100)
    lrs = bind_lr(opt)
    alloc = adarank.RankAllocator(named, adarank.make_schedule(12, 0.0, 0.25, 1), sum(m.r for m in layers) // 2)
    orth = OrthGrad(layers, 0.1)

    def loss_of(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(**batch).loss

    def update():
        r = orth()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return r

    graphs = GraphedStep(loss_of, update, params, grad_accum=2, max_shapes=1) if graphed else None
    return model, opt, sched, lrs, alloc, loss_of, update, graphs


def _train(graphed: bool, batches, dev, shrink_at: int | None = None, fused: bool = False):
    model, opt, sched, lrs, alloc, loss_of, update, graphs = _rig(graphed, dev, fused)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, snaps = [], []
    for i in range(0, len(batches), 2):
        for b in batches[i:i + 2]:  # grad_accum 2
            if graphs is not None:
                loss = graphs.micro(b)
            else:
                loss = loss_of(b)
                (loss / 2).backward()
            losses.append(loss.float().item())
        r = graphs.update() if graphs is not None else update()
        losses.append(r.item())
        sched.step()
        sync_lr(opt, lrs)
        res = alloc.step()
        if shrink_at is not None and res.phase == "final" and not alloc.shrunk:
            alloc.shrink(opt)
            params[:] = [p for p in model.parameters() if p.requires_grad]
            if graphs is not None:
                graphs.reset(params)
        if graphs is not None:
            graphs.zero_grads()
        else:
            opt.zero_grad(set_to_none=True)
        snaps.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    return losses, snaps, graphs


def _batches(dev, n_steps: int):
    # two shapes: length 7 (captured, max_shapes=1) and length 5 (always eager after the cap is hit)
    out = []
    for i in range(2 * n_steps):
        seq = 5 if i % 4 == 3 else 7
        out.append({k: v.to(dev) for k, v in make_batch(n=4, seq=seq, seed=10 + i).items()})
    return out


@cuda
def test_graphed_training_matches_eager_training_bit_for_bit():
    dev = torch.device("cuda")
    batches = _batches(dev, 8)
    eager_losses, eager, _ = _train(False, batches, dev)
    graph_losses, graphed, graphs = _train(True, batches, dev)
    assert graphs.captures == 2  # one micro-batch shape and the update; the second shape stays eager
    assert graphs.capture_seconds > 0
    assert graph_losses == eager_losses
    for step, (a, b) in enumerate(zip(eager, graphed)):
        for name in a:
            assert torch.equal(a[name], b[name]), (step, name)


@cuda
@pytest.mark.parametrize("shrink_at", [None, 0])
def test_graphed_fused_training_matches_eager_fused_training(shrink_at):
    """With method.fused, the graphed step groups query and value (adarank/siblings.py) and accumulates
    the adapters' gradients in their GEMMs (grads_into_buffers), while the eager step hands them to
    autograd: equal up to the rounding of those sums, through a shrink too."""
    dev = torch.device("cuda")
    batches = _batches(dev, 12)
    eager_losses, eager, _ = _train(False, batches, dev, shrink_at, fused=True)
    graph_losses, graphed, graphs = _train(True, batches, dev, shrink_at, fused=True)
    assert graph_losses == pytest.approx(eager_losses, rel=2e-3, abs=1e-4)
    assert eager[-1].keys() == graphed[-1].keys()
    for name in eager[-1]:
        torch.testing.assert_close(eager[-1][name], graphed[-1][name], rtol=2e-3, atol=2e-4, msg=name)


@cuda
def test_graphs_are_recaptured_after_a_shrink():
    dev = torch.device("cuda")
    batches = _batches(dev, 12)
    eager_losses, eager, _ = _train(False, batches, dev, shrink_at=0)
    graph_losses, graphed, graphs = _train(True, batches, dev, shrink_at=0)
    assert graph_losses == eager_losses
    assert eager[-1].keys() == graphed[-1].keys()
    for name in eager[-1]:
        assert torch.equal(eager[-1][name], graphed[-1][name]), name
    assert graphs.captures >= 4  # before and after the shrink


@cuda
def test_a_replay_really_runs_the_step():
    """Guard against a graph that replays nothing: the parameters move at every replayed step."""
    dev = torch.device("cuda")
    *_, graphs = _rig(True, dev)
    b = {k: v.to(dev) for k, v in make_batch(n=4, seq=7, seed=5).items()}
    before = None
    for step in range(5):
        graphs.micro(b)
        graphs.micro(b)
        graphs.update()
        graphs.zero_grads()
        now = copy.deepcopy([p.detach() for p in graphs.params])
        if before is not None and step >= 2:  # steps 2+ are replays
            assert any(not torch.equal(x, y) for x, y in zip(before, now)), step
        before = now
    assert graphs.captures == 2


def steps(graphs: GraphedStep, b: dict, n: int) -> None:
    for _ in range(n):
        graphs.micro(b)
        graphs.update()
        graphs.zero_grads()


@cuda
def test_an_uncapturable_forward_falls_back_to_eager_with_a_warning():
    """A forward that copies a pageable CPU tensor to the GPU (as DeBERTa-v2's position buckets do) cannot
    be captured: the step warns once, runs eagerly, and still trains exactly like the eager loop."""
    dev = torch.device("cuda")
    lin = torch.nn.Linear(4, 1).to(dev)

    def loss_of(batch):
        offset = torch.tensor(0.5).to(dev)  # a host-to-device copy in every forward
        return (lin(batch["x"]) + offset).square().mean()

    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    graphs = GraphedStep(loss_of, lambda: opt.step(), list(lin.parameters()))
    ref = copy.deepcopy(lin)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    b = {"x": torch.randn(8, 4, device=dev)}
    with pytest.warns(UserWarning, match="cannot be captured"):
        steps(graphs, b, 4)
    for _ in range(4):
        (ref(b["x"]) + 0.5).square().mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    assert graphs.capture_error is not None and "pinned" in graphs.capture_error
    torch.testing.assert_close(lin.weight, ref.weight)


def test_bind_lr_moves_a_checkpointed_rate_onto_the_parameters_device():
    """A checkpoint loads the optimizer on the CPU map location: a tensor rate there, or of another dtype,
    is replaced by a fresh float32 tensor next to the parameters (here both on the CPU, so the dtype)."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=torch.float64)
    (t,) = bind_lr(opt)
    assert t.dtype == torch.float32 and t.device == p.device and t.item() == pytest.approx(0.05)
    assert bind_lr(opt)[0] is t  # already bound: kept


@cuda
def test_bind_lr_after_loading_a_graphed_checkpoint_puts_the_rate_on_the_gpu():
    dev = torch.device("cuda")
    p = torch.nn.Parameter(torch.zeros(3, device=dev))
    opt = torch.optim.AdamW([p], lr=0.1, fused=True, capturable=True)
    bind_lr(opt)
    p.grad = torch.ones_like(p)
    opt.step()
    state = torch.load(_roundtrip(opt.state_dict()), map_location="cpu", weights_only=False)
    opt2 = torch.optim.AdamW([p], lr=0.1, fused=True, capturable=True)
    opt2.load_state_dict(state)
    assert opt2.param_groups[0]["lr"].device.type == "cpu"  # what a resumed run starts from
    (t,) = bind_lr(opt2)
    assert t.device == p.device and t.device.type == "cuda"  # p is on cuda:0; torch.device("cuda") has no index


def _roundtrip(obj):
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf
