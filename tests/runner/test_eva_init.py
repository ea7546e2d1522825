"""method=eva's runner glue: its config checks, the adapters it builds (fused and not), resuming without the
SVD, and DDP (rank 0 computes, every rank gets the same init)."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from conftest import BERT_TARGETS, make_batch, tiny_bert

from adarank.inject import adapters
from adarank.layers import LoraLinear
from adarank.runner import distributed, eva_init
from adarank.runner.config import EvaConfig, MethodConfig, ModelConfig
from adarank.runner.methods import apply_method, build_allocator
from adarank.schedule import make_schedule

#: query, value and the dense layers of the encoder (BERT_TARGETS less the pooler, which sees one row per example)
TARGETS = ["query", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


class ListBatches:
    """The attributes of `Batches` that eva_batches reads, over fixed batches."""

    def __init__(self, batches, rank: int = 0, world_size: int = 1):
        self.batches, self.batch_size, self.rank, self.world_size, self.pin_memory = batches, 4, rank, world_size, False

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        assert (epoch, start_batch) == (0, 0)

    def __iter__(self):
        # the shard a rank would see; eva_batches asks for the whole split (world_size 1)
        return iter(self.batches[self.rank::self.world_size])


def _batches(n: int = 6):
    return [make_batch(n=4, seq=7, seed=s) for s in range(n)]


def _method(**kw) -> MethodConfig:
    eva = EvaConfig(rho=kw.pop("rho", 8.0), n_batches=6)
    return MethodConfig(name="eva", r=1, alpha=4.0, targets=TARGETS, eva=eva, **kw)


def _build(method_cfg: MethodConfig, saved=None, train=None, dist=distributed.DistInfo()):
    adapted = apply_method(tiny_bert(), method_cfg, ModelConfig(train_modules=["classifier"]))
    adapted.init_from_data(eva_init.InitData(train or ListBatches(_batches()), torch.device("cpu"), dist, saved,
                                             log=lambda *_: None))
    return adapted


@pytest.mark.parametrize("field,value", [("rho", 0.5), ("tau", 1.5), ("n_batches", 0), ("batch_size", 0),
                                         ("max_passes", 0), ("rho", float("nan"))])
def test_bad_eva_settings_name_their_field(field, value):
    with pytest.raises(ValueError, match=rf"^method\.eva\.{field}: "):
        EvaConfig(**{field: value})


def test_the_adapters_follow_the_init_and_rank_0_modules_stay_plain():
    adapted = _build(_method())
    ranks = build_allocator(adapted, _method(), 10).ranks
    layers = dict(adapters(adapted.model))
    assert sum(ranks.values()) == len(adapted.targets) and 0 in ranks.values() and len(set(ranks.values())) > 1
    for name, rank in ranks.items():
        module = adapted.model.get_submodule(name)
        assert isinstance(module, LoraLinear) == (rank > 0), name
        if rank:
            assert module.lora_A.shape[0] == rank and module.scale == pytest.approx(4.0 / 1)  # α·r_i/r over r_i
            assert not module.lora_B.any()
    assert adapted.report.trainable == sum(p.numel() for p in adapted.model.parameters() if p.requires_grad)
    assert len(layers) == sum(1 for r in ranks.values() if r)
    # without adjust_scaling_factors each module keeps α: scale α/r_i
    m = _method()
    m.eva.adjust_scaling_factors = False
    for name, layer in adapters(_build(m).model):
        assert layer.scale == pytest.approx(4.0 / ranks[name])


def test_fused_equals_unfused_after_the_init():
    models = [_build(_method(fused=fused)).model for fused in (False, True)]
    with torch.no_grad():  # the same nonzero B in both, so the adapters contribute
        g = torch.Generator().manual_seed(0)
        for (_, a), (_, b) in zip(adapters(models[0]), adapters(models[1])):
            a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g))
            b.lora_B.copy_(a.lora_B)
    assert all(layer.fused for _, layer in adapters(models[1]))
    outs, grads = [], []
    for model in models:
        loss = model(**make_batch()).loss
        loss.backward()
        outs.append(loss.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resuming_rebuilds_the_checkpoints_pattern_without_the_svd(monkeypatch):
    first = _build(_method())
    state = build_allocator(first, _method(), 10).state_dict()
    monkeypatch.setattr(eva_init, "eva", lambda *a, **k: pytest.fail("the SVD ran again on resume"))
    again = _build(_method(), saved={"allocator": copy.deepcopy(state)})
    allocator = build_allocator(again, _method(), 10)
    allocator.load_state_dict(state)
    shapes = [{n: p.shape for n, p in m.model.named_parameters() if p.requires_grad} for m in (first, again)]
    assert shapes[0] == shapes[1] and allocator.ranks == state["ranks"]
    with pytest.raises(ValueError, match="rank pattern differs"):
        allocator.load_state_dict({**state, "ranks": {**state["ranks"], first.targets[0]: 5}})


def test_not_converging_names_the_field_to_raise():
    m = _method()
    m.eva.tau, m.eva.max_passes = 1.0, 1
    with pytest.raises(ValueError, match=r"^method\.eva\.max_passes: .* not converged after 6 forward passes"):
        _build(m)


def test_a_layer_with_too_few_rows_per_batch_names_the_batch_size():
    m = _method()
    m.targets = BERT_TARGETS  # the pooler: 4 rows per batch of 4 examples, 8 components wanted
    m.eva.max_passes = 1
    with pytest.raises(ValueError, match=r"^method\.eva\.batch_size: bert\.pooler\.dense got fewer rows per batch "
                                         r"than its 8 components"):
        _build(m)


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    calls = []
    real = eva_init.eva
    eva_init.eva = lambda *a, **k: calls.append(1) or real(*a, **k)
    adapted = _build(_method(), train=ListBatches(_batches(), rank, 2), dist=info)
    a = {n: layer.lora_A.detach().clone() for n, layer in adapters(adapted.model)}
    torch.save({"A": a, "calls": len(calls)}, os.path.join(out, f"rank{rank}.pt"))
    distributed.teardown(info)


def test_ddp_rank_0_computes_and_every_rank_gets_the_same_init(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the workers inherit the imported modules (spawn would import torch and transformers again, ~20 s)
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [g["calls"] for g in got] == [1, 0]
    assert got[0]["A"].keys() == got[1]["A"].keys()
    assert all(torch.equal(got[0]["A"][n], got[1]["A"][n]) for n in got[0]["A"])
    # and it is the single-process init: the SVD saw the whole split on rank 0, not its shard
    single = {n: layer.lora_A for n, layer in adapters(_build(_method()).model)}
    assert all(torch.equal(single[n], got[0]["A"][n]) for n in single)
