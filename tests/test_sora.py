"""adarank.sora: the gates' proximal step on hand-made values, the budget-targeted controller landing exactly on
adalora's budget, the fixed-ξ variant, the shrink with the optimizer state, and (through the runner) resume
across the shrink, export to PEFT and the config's one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

import adarank
from adarank.runner import checkpoint as ckpt
from adarank.runner.config import MethodConfig
from adarank.schedule import Schedule
from adarank.sora import SoraAllocator, init_gates_, soft_threshold

from conftest import make_batch, svd_bert
from e2e import capture_models, differing_tensors, one_thread, run, tiny_config  # noqa: F401


def gates(layers) -> torch.Tensor:
    return torch.cat([m.lam.detach() for _, m in layers])


def test_soft_threshold_is_the_l1_prox():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 3.0])
    assert torch.equal(soft_threshold(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.5, 2.0]))


def test_the_allocator_thresholds_by_xi_times_the_optimizers_lr():
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    n = len(layers)
    with torch.no_grad():
        for _, m in layers:
            m.lam.copy_(torch.tensor([-3.0, -1.0, 0.5, 1.5]))
    opt = torch.optim.SGD([m.lam for _, m in layers], lr=0.5)  # only its lr is read: no optimizer step here
    alloc = SoraAllocator(layers, Schedule(total=10, t_init=0, t_final=2, delta_t=1), 2 * n, xi=2.0, targeted=False)
    a = alloc.step()  # the allocator has not seen the optimizer yet: no lr, no threshold
    assert a.threshold is None and torch.equal(gates(layers), torch.tensor([-3.0, -1.0, 0.5, 1.5]).repeat(n))
    alloc.maybe_shrink(opt)  # the lr of the coming step: 0.5, so τ = ξ·lr = 1
    a = alloc.step(update_importance=False)  # a step the optimizer skipped: no proximal step either
    assert a.threshold is None and a.budget == 4 * n
    a = alloc.step()
    assert float(a.threshold) == 1.0
    # exact; 1.5 keeps 0.5 (the reference code's three masked updates would zero every |λ| < 2τ)
    assert torch.equal(gates(layers), torch.tensor([-2.0, 0.0, 0.0, 0.5]).repeat(n))
    assert torch.equal(a.mask, gates(layers) != 0) and a.ranks.tolist() == [2] * n and a.budget == 2 * n
    assert isinstance(alloc, adarank.Allocator)


def train_tiny(alloc_kw: dict, steps: int = 24, lr: float = 0.05):
    """A real AdamW run of the tiny SVD BERT (SoRA's gate init) driven by a SoraAllocator; per step, the
    allocation and ξ before and after it."""
    model, _ = svd_bert()
    layers = adarank.svd_adapters(model)
    torch.manual_seed(1)
    init_gates_([m for _, m in layers], "normal")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    alloc = SoraAllocator(layers, Schedule(total=steps, t_init=2, t_final=6, delta_t=1), **alloc_kw)
    trace, batch = [], make_batch(n=8)
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        xi = float(alloc.xi)
        a = alloc.step()
        trace.append((a, xi, float(alloc.xi), int((gates(layers) != 0).sum())))
        alloc.maybe_shrink(opt)
        opt.zero_grad(set_to_none=True)
    return model, layers, alloc, opt, trace


def test_targeted_variant_follows_the_budget_and_lands_exactly_on_it():
    model, layers, alloc, opt, trace = train_tiny(dict(target_total=20, xi=2.0, xi_growth=1.5, shrink_at_final=True))
    assert alloc.init_total == 44
    for a, xi_before, xi_after, live in trace:
        if a.phase == "budget":
            n_live = int(a.mask.sum())
            assert n_live == live and a.threshold is not None  # the mask is λ ≠ 0
            want = xi_before * (1.5 if n_live > a.budget else 1 / 1.5 if n_live < a.budget else 1.0)
            assert xi_after == pytest.approx(want, rel=1e-6)  # the controller's rule
    budget_phase = [live for a, _, _, live in trace if a.phase == "budget"]
    assert min(budget_phase) < 44  # the threshold itself killed gates before the final hard prune
    final = next(a for a, *_ in trace if a.masked and a.phase == "final")
    assert final.step == 18 and int(final.mask.sum()) == 20 and final.budget == 20
    # shrunk right after the final mask: exactly the budget is left, and the optimizer state was sliced
    assert alloc.shrunk and sum(m.r for _, m in layers) == 20 and trace[-1][0].budget == 20
    for _, m in layers:
        for p in (m.P, m.lam, m.Q):
            if p.requires_grad:
                assert opt.state[p]["exp_avg"].shape == p.shape


def test_the_default_growth_lets_xi_move_four_decades_over_the_budgeting_phase():
    layers = adarank.svd_adapters(svd_bert()[0])
    alloc = SoraAllocator(layers, Schedule(total=125, t_init=12, t_final=25, delta_t=5), 20, xi=0.1)
    assert alloc.xi_growth == pytest.approx(10 ** (4 / 17))  # masking at t = 15, 20, ..., 95


def test_fixed_variant_keeps_the_gates_that_live():
    _, layers, alloc, _, trace = train_tiny(dict(target_total=20, xi=1.0, targeted=False, shrink_at_final=True))
    xis = {xi for _, xi, _, _ in trace}
    assert xis == {1.0}  # never tuned
    for a, _, _, live in trace[:17]:
        assert a.budget == live  # the live count
    final = trace[17][0]
    assert final.phase == "final" and final.masked and final.budget == alloc.final_total
    assert sum(m.r for _, m in layers) == alloc.final_total < 44


def test_a_shrunk_state_shrinks_a_fresh_model():
    model, layers, alloc, opt, trace = train_tiny(dict(target_total=20, xi=2.0, xi_growth=1.5, shrink_at_final=True))
    state, weights = alloc.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
    fresh, _ = svd_bert(seed=5)
    again = SoraAllocator(adarank.svd_adapters(fresh), alloc.schedule, 20, xi=2.0, xi_growth=1.5, shrink_at_final=True)
    again.load_state_dict(state)  # shrinks the fresh layers to the saved ranks, so the weights fit
    assert [m.r for m in again.layers] == [m.r for _, m in layers] and again.shrunk and again.final_total == 20
    fresh.load_state_dict(weights)
    assert again.state_dict()["xi"] == state["xi"] and again.lr == alloc.lr
    with pytest.raises(ValueError, match="variant"):
        SoraAllocator(adarank.svd_adapters(svd_bert()[0]), alloc.schedule, 20, xi=2.0, targeted=False).load_state_dict(state)


def test_config_errors_name_the_field():
    for kw, field in ((dict(sora_xi=-1.0), "method.sora_xi"), (dict(sora_xi_growth=1.0), "method.sora_xi_growth"),
                      (dict(sora_gate_init="ones"), "method.sora_gate_init")):
        with pytest.raises(ValueError) as info:
            MethodConfig(name="sora", **kw)
        assert str(info.value).startswith(field + ":") and "\n" not in str(info.value)


def strip_adapters(model):
    """The base model under the adapters (a copy): each adapted layer replaced by the layer it wraps."""
    base = copy.deepcopy(model)
    for name, layer in adarank.adapters(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base)
    return base


@pytest.mark.usefixtures("one_thread")
def test_resumed_across_the_shrink_equals_uninterrupted_and_exports_to_peft(tmp_path, monkeypatch):
    # T = 20, t_f = 4: the final mask at step 16 (shrunk there). Killed during step 18, the run resumes from the
    # checkpoint at 12, in the budgeting phase (ξ and the lr restored), and crosses the shrink again
    overrides = ["method=sora", "method.r=2", "train.checkpoint_every=6", "train.log_every=3", "train.lr=0.05",
                 "method.sora_xi=2.0", "method.sora_xi_growth=1.5"]
    models = capture_models(monkeypatch)
    want = run(tiny_config(tmp_path, *overrides), tmp_path / "straight")
    (straight,) = models
    assert sum(want["final_ranks"].values()) == 24 and want["budget"] == 2  # adalora's final budget, exactly
    assert want["budget_curve"][0][1] == 36 and want["budget_curve"][-1][1] == 24
    assert sum(m.r for _, m in adarank.svd_adapters(straight)) == 24  # shrunk

    out = tmp_path / "killed"
    capture_models(monkeypatch, kill_at=18)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tmp_path, *overrides), out)
    state = ckpt.load(str(out))
    assert state["step"] == 12 and not state["allocator"]["frozen"] and state["allocator"]["xi"] != 2.0
    models = capture_models(monkeypatch)
    got = run(tiny_config(tmp_path, *overrides, "resume=true"), out)
    (resumed,) = models
    for key in ("value", "metrics", "final_ranks", "budget_curve", "steps", "evals", "train_log"):
        assert got[key] == want[key], key
    assert differing_tensors(ckpt.trainable_state(straight), ckpt.trainable_state(resumed)) == []

    # the exported adapter (PEFT LoRA with rank_pattern) loads in PEFT and gives the same logits
    straight.eval()
    loaded = PeftModel.from_pretrained(strip_adapters(straight), str(tmp_path / "straight" / "adapter")).eval()
    batch = make_batch()
    with torch.no_grad():
        ours, theirs = straight(**batch).logits, loaded(**batch).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.usefixtures("one_thread")
def test_fixed_variant_reports_the_rank_it_landed_on(tmp_path):
    res = run(tiny_config(tmp_path, "method=sora_fixed", "method.r=2", "train.max_steps=10", "train.lr=0.05",
                          "method.sora_xi=4.0"), tmp_path / "out")
    kept = sum(res["final_ranks"].values())
    assert 0 < kept < 36 and res["budget"] == pytest.approx(kept / 12, abs=1e-3)
    assert res["budget_curve"][-1][1] == kept
