"""Parity with PEFT's AdaLoRA (`peft.tuners.adalora`): the reference implementation.

One tiny BERT is wrapped twice, by `peft.get_peft_model(AdaLoraConfig)` and by `adarank.inject("svd")`,
with PEFT's initial (A, E, B) copied into our (Q, λ, P). Both then see the same parameter updates and the
same gradients at every step, and we compare, at every step:

* the importance EMAs Ī and Ū of every P, λ, Q: bit-exact (`torch.equal`). Both sides run the same
  float32 arithmetic in the same order (β·Ī + (1−β)·I, then β·Ū + (1−β)·|I − Ī|), so any difference is a
  real divergence, not rounding.
* the budget and whether a mask is computed: exact integers / booleans.
* the threshold (PEFT's is captured by spying on `torch.kthvalue`): bit-exact.
* λ itself (so which triplets are zeroed) and PEFT's `rank_pattern` vs our masks and ranks: exact.

Mapping: PEFT lora_A (r, in) = Q, lora_E (r, 1) = λ, lora_B (out, r) = P; PEFT's global_step = our
allocator's 1-based step counter t.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator

import adarank
from adarank.schedule import Schedule

from conftest import BERT_TARGETS, make_batch, tiny_bert

ROLES = (("P", "lora_B"), ("lam", "lora_E"), ("Q", "lora_A"))


@contextlib.contextmanager
def spy_kthvalue(captured: list):
    """Record the k-th value of every `torch.kthvalue` call inside the block (PEFT's threshold)."""
    real = torch.kthvalue

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        captured.append(out[0].clone())
        return out

    torch.kthvalue = spy
    try:
        yield captured
    finally:
        torch.kthvalue = real


class Pair:
    """The same tiny BERT adapted by PEFT AdaLoRA and by adarank, with identical initial adapters."""

    def __init__(self, sch: Schedule, beta1=0.85, beta2=0.85, init_r=4, target_r=2, alpha=8.0, rslora=False,
                 task_type=None, orth_reg_weight=0.1):
        base = tiny_bert()
        self.base = copy.deepcopy(base)
        cfg = AdaLoraConfig(
            init_r=init_r,
            target_r=target_r,
            lora_alpha=alpha,
            lora_dropout=0.0,
            tinit=sch.t_init,
            tfinal=sch.t_final,
            deltaT=sch.delta_t,
            total_step=sch.total,
            beta1=beta1,
            beta2=beta2,
            target_modules=BERT_TARGETS,
            task_type=task_type,
            orth_reg_weight=orth_reg_weight,
        )
        torch.manual_seed(7)
        self.peft = get_peft_model(copy.deepcopy(base), cfg)
        self.ours = copy.deepcopy(base)
        adarank.inject(self.ours, "svd", r=init_r, alpha=alpha, targets=BERT_TARGETS, rslora=rslora)
        self.layers = adarank.svd_adapters(self.ours)
        inner = self.peft.base_model.model
        self.pairs = []  # (our param, PEFT param, PEFT allocator key) in (layer, role) order
        with torch.no_grad():
            for name, m in self.layers:
                pl = inner.get_submodule(name)
                for ours_role, peft_role in ROLES:
                    theirs = getattr(pl, peft_role)["default"]
                    mine = getattr(m, ours_role)
                    mine.copy_(theirs.view_as(mine))
                    self.pairs.append((mine, theirs, f"{name}.{peft_role}.default"))
        shapes = [(m.in_features, m.out_features) for _, m in self.layers]
        self.budget = adarank.resolve_budget(shapes, target_rank=target_r, init_rank=init_r)
        self.alloc = adarank.RankAllocator(self.layers, sch, self.budget.target_total, beta1=beta1, beta2=beta2)
        self.sch = sch
        self.ra = self.peft.base_model.rankallocator

    def drive(self, t: int, scale: float = 0.05) -> None:
        """Same 'optimizer update' and same gradients for both, drawn from a per-step seed."""
        g = torch.Generator().manual_seed(1000 + t)
        with torch.no_grad():
            for mine, theirs, _ in self.pairs:
                delta = torch.randn(mine.shape, generator=g) * scale
                grad = torch.randn(mine.shape, generator=g)
                mine.add_(delta)
                theirs.add_(delta.view_as(theirs))
                mine.grad = grad
                theirs.grad = grad.clone().view_as(theirs)

    def peft_step(self, t: int) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        with spy_kthvalue(captured):
            self.peft.base_model.update_and_allocate(t)
        return captured


SCHEDULES = [
    # (T, t_init, t_final, ΔT, β1, β2)
    pytest.param(12, 2, 3, 1, 0.85, 0.85, id="T12-ti2-tf3-dT1"),
    pytest.param(16, 3, 4, 3, 0.85, 0.85, id="T16-ti3-tf4-dT3"),
    pytest.param(10, 0, 0, 1, 0.5, 0.95, id="T10-ti0-tf0-dT1"),
    pytest.param(15, 2, 0, 2, 0.95, 0.3, id="T15-ti2-tf0-dT2"),
    pytest.param(14, 1, 5, 4, 0.7, 0.7, id="T14-ti1-tf5-dT4"),
]


@pytest.mark.parametrize("total,ti,tf,dt,beta1,beta2", SCHEDULES)
def test_allocator_matches_peft_every_step(total, ti, tf, dt, beta1, beta2):
    pair = Pair(Schedule(total=total, t_init=ti, t_final=tf, delta_t=dt), beta1, beta2)
    alloc, ra = pair.alloc, pair.ra
    cfg = pair.peft.peft_config["default"]
    assert (ra.init_bgt, ra.target_bgt) == (pair.budget.init_total, pair.budget.target_total) == (44, 22)
    end = total - tf
    n_masked = 0
    for t in range(1, total + 3):  # a few steps past T: the final mask must stay put
        pair.drive(t)
        captured = pair.peft_step(t)
        a = alloc.step()

        # (b) budget and masking flag
        budget, mask_ind = ra.budget_schedule(t)
        assert (a.step, a.budget) == (t, budget)
        peft_masked = (mask_ind and t < end) or t == end  # later steps only re-apply the final pattern
        assert a.masked == peft_masked, t
        assert a.phase == ("init" if t <= ti else "budget" if t < end else "final")

        # (a) importance EMAs, bit for bit; both sides drop them once the final mask is fixed
        if t < end:
            assert len(alloc.ema_ipt) == len(pair.pairs) == len(ra.exp_avg_ipt)
            for (mine, _, key), e_ipt, e_unc in zip(pair.pairs, alloc.ema_ipt, alloc.ema_unc):
                assert torch.equal(e_ipt, ra.exp_avg_ipt[key].view_as(mine)), (t, key)
                assert torch.equal(e_unc, ra.exp_avg_unc[key].view_as(mine)), (t, key)
        else:
            assert alloc.ema_ipt is None and ra.exp_avg_ipt == {}

        # (c) threshold, bit for bit
        if peft_masked:
            n_masked += 1
            assert len(captured) == 1 and a.threshold is not None
            assert torch.equal(a.threshold, captured[0]), t
        else:
            assert captured == [] and a.threshold is None

        # (d) λ (hence the zeroed triplets) and the rank pattern
        for mine, theirs, key in pair.pairs:
            if key.endswith("lora_E.default"):
                assert torch.equal(mine, theirs.view(-1)), (t, key)
        if cfg.rank_pattern is None:
            assert a.ranks.tolist() == [4] * len(pair.layers)
        else:
            for (name, _), mk, r in zip(pair.layers, alloc.module_masks(), a.ranks.tolist()):
                pattern = cfg.rank_pattern[f"{name}.lora_E.default"]
                assert mk.tolist() == pattern and r == sum(pattern), (t, name)
        if t >= end:
            assert int(a.ranks.sum()) == pair.budget.target_total
    assert n_masked >= 2
    final = a.ranks.tolist()
    assert len(set(final)) > 1, f"the run should allocate unevenly, got {final}"


def test_make_schedule_fractions_give_peft_integers():
    """make_schedule(20, 0.1, 0.25, 2) is PEFT's tinit=2, tfinal=5, deltaT=2."""
    sch = adarank.make_schedule(20, 0.1, 0.25, 2)
    assert sch == Schedule(total=20, t_init=2, t_final=5, delta_t=2)


def _peft_schedule(b0: int, bT: int, ti: int, tf: int, total: int, dt: int) -> PeftRankAllocator:
    ra = object.__new__(PeftRankAllocator)  # budget_schedule only reads these fields
    ra.peft_config = types.SimpleNamespace(tinit=ti, tfinal=tf, total_step=total, deltaT=dt)
    ra.init_bgt, ra.target_bgt = b0, bT
    return ra


@pytest.mark.parametrize("b0,bT", [(44, 22), (12, 1), (144, 96)])
def test_budget_at_equals_peft_budget_schedule_on_a_grid(b0, bT):
    checked = 0
    for total in (5, 10, 37, 100):
        for ti in (0, 1, 4, 20):
            for tf in (0, 2, 30):
                if total - tf - ti < 1:
                    continue
                for dt in (1, 3, 10):
                    ra = _peft_schedule(b0, bT, ti, tf, total, dt)
                    for step in range(0, total + 3):
                        assert adarank.budget_at(step, b0, bT, ti, tf, total, dt) == ra.budget_schedule(step), (
                            step,
                            ti,
                            tf,
                            total,
                            dt,
                        )
                        checked += 1
    assert checked > 2000


# ----- where we differ on purpose, and only there ---------------------------------------------------


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("alpha", [8.0, 3.0])
def test_forward_matches_peft_up_to_its_scale_epsilon(alpha):
    """Same triplets, same logits: PEFT's scale is α/(r + 1e-5), ours α/r (relative 2.5e-6 at r = 4),
    so the logits agree to 1e-5 but not bit for bit."""
    pair = Pair(Schedule(total=10, t_init=2, t_final=2, delta_t=1), alpha=alpha)
    for t in range(1, 4):
        pair.drive(t, scale=0.2)
    batch = make_batch()
    ours, theirs, base = _logits(pair.ours, batch), _logits(pair.peft, batch), _logits(pair.base, batch)
    assert (ours - base).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_rslora_scale_is_the_only_difference():
    """(i) PEFT's AdaLoRA ignores use_rslora (scale α/r); ours uses α/√r_init. With PEFT's α set to α·√r
    the two compute the same function again."""
    sch = Schedule(total=10, t_init=2, t_final=2, delta_t=1)
    r, alpha = 4, 8.0
    mine = Pair(sch, alpha=alpha, rslora=True)
    ref = Pair(sch, alpha=alpha * math.sqrt(r))
    ignored = Pair(sch, alpha=alpha)
    ignored.peft = get_peft_model(
        copy.deepcopy(ignored.base),
        AdaLoraConfig(
            init_r=r, target_r=2, lora_alpha=alpha, use_rslora=True, total_step=10, target_modules=BERT_TARGETS
        ),
    )
    assert {m.scale for _, m in mine.layers} == {alpha / math.sqrt(r)} == {alpha * math.sqrt(r) / r}
    assert {m.scale for _, m in ignored.layers} == {alpha / r}
    for p in (mine, ref, ignored):
        for t in range(1, 3):
            p.drive(t, scale=0.2)
    # the PEFT rsLoRA model got the same adapter weights as `ignored.ours`
    with torch.no_grad():
        for name, m in ignored.layers:
            pl = ignored.peft.base_model.model.get_submodule(name)
            pl.lora_A["default"].copy_(m.Q)
            pl.lora_E["default"].copy_(m.lam.view(-1, 1))
            pl.lora_B["default"].copy_(m.P)
    batch = make_batch()
    torch.testing.assert_close(_logits(mine.ours, batch), _logits(ref.peft, batch), rtol=0, atol=1e-5)
    torch.testing.assert_close(_logits(ignored.peft, batch), _logits(ignored.ours, batch), rtol=0, atol=1e-5)
    assert (_logits(mine.ours, batch) - _logits(ignored.ours, batch)).abs().max() > 1e-3


def test_budget_equal_to_initial_keeps_all_ranks_where_peft_crashes():
    """(ii) init_r == target_r gives k = 0 at every masking step: PEFT's kthvalue raises (peft#2337), we keep
    every triplet. Before that step the two agree."""
    pair = Pair(Schedule(total=10, t_init=1, t_final=2, delta_t=1), init_r=4, target_r=4)
    pair.drive(1)
    pair.peft_step(1)  # t ≤ t_init: no masking, no kthvalue
    a = pair.alloc.step()
    for (mine, _, key), e in zip(pair.pairs, pair.alloc.ema_ipt):
        assert torch.equal(e, pair.ra.exp_avg_ipt[key].view_as(mine))
    pair.drive(2)
    with pytest.raises(RuntimeError, match="kthvalue"):
        pair.peft_step(2)
    a = pair.alloc.step()
    assert a.masked and a.threshold is None and a.budget == 44
    assert a.ranks.tolist() == [4] * 11
    assert all(bool((m.lam != 0).all()) for _, m in pair.layers)


def test_shrink_keeps_the_masked_peft_function():
    """(iii) PEFT only masks; we also remove the pruned triplets. After the shrink our logits are the
    masked PEFT logits (to PEFT's 1e-5 scale epsilon) and our own pre-shrink logits (to 1e-6)."""
    total = 12
    pair = Pair(Schedule(total=total, t_init=2, t_final=3, delta_t=1))
    for t in range(1, total + 1):
        pair.drive(t, scale=0.1)
        pair.peft_step(t)
        pair.alloc.step()
    # the last step perturbed pruned λ too ('optimizer update'); both sides re-applied the final mask
    batch = make_batch()
    before, theirs = _logits(pair.ours, batch), _logits(pair.peft, batch)
    ranks = pair.alloc.ranks().tolist()
    pair.alloc.shrink()
    after = _logits(pair.ours, batch)
    assert [m.r for _, m in pair.layers] == ranks and sum(ranks) == 22
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, theirs, rtol=0, atol=1e-5)
    assert (after - _logits(pair.base, batch)).abs().max() > 1e-3  # 100× the tolerance: the adapters matter


@pytest.mark.parametrize("orth_weight", [0.0, 0.1])
def test_training_with_real_gradients_matches_peft_step_by_step(orth_weight):
    """The whole optimizer step, not only the allocator: real batches, forward and backward, the orthogonal
    regulariser (PEFT's inside its loss, ours as `orth_grad_`), clipping, AdamW, then the allocators. From the
    same initial adapters, both train alike through all three phases: weights within 1e-5, equal masks."""
    from adarank.orth import orth_grad_

    sch = Schedule(total=40, t_init=4, t_final=10, delta_t=2)
    pair = Pair(sch, init_r=4, target_r=2, alpha=8.0, task_type="SEQ_CLS", orth_reg_weight=orth_weight)
    layers = [m for _, m in pair.layers]
    for model in (pair.peft, pair.ours):
        for p in model.parameters():
            p.requires_grad_(False)
    mine = [m.requires_grad_(True) for m, _, _ in pair.pairs]
    theirs = [t.requires_grad_(True) for _, t, _ in pair.pairs]
    opt_mine = torch.optim.AdamW(mine, lr=2e-2, weight_decay=0.0)
    opt_theirs = torch.optim.AdamW(theirs, lr=2e-2, weight_decay=0.0)
    masked_steps = 0
    for t in range(1, sch.total + 1):
        batch = make_batch(n=8, seq=7, seed=t)
        loss_theirs = pair.peft(**batch).loss
        loss_theirs.backward()
        loss_mine = pair.ours(**batch).loss
        loss_mine.backward()
        reg = orth_grad_(layers, orth_weight) if orth_weight else torch.zeros(())
        # PEFT's loss carries weight · R; ours adds R's gradient directly
        assert loss_theirs.item() == pytest.approx(loss_mine.item() + orth_weight * reg.item(), abs=1e-5)
        torch.nn.utils.clip_grad_norm_(theirs, 1.0)
        torch.nn.utils.clip_grad_norm_(mine, 1.0)
        opt_theirs.step()
        opt_mine.step()
        pair.peft.base_model.update_and_allocate(t)
        pair.alloc.step()
        opt_theirs.zero_grad()
        opt_mine.zero_grad()
        worst = max(float((m - th.view_as(m)).abs().max()) for m, th, _ in pair.pairs)
        assert worst < 1e-5, f"step {t}: weights differ by {worst}"
        lam_mine = torch.cat([m.lam.detach() for m in layers])
        lam_theirs = torch.cat([th.detach().flatten() for _, th, k in pair.pairs if ".lora_E." in k])
        assert torch.equal(lam_mine == 0, lam_theirs == 0), f"step {t}: masks differ"
        masked_steps += int((lam_mine == 0).any())
    assert masked_steps > 20  # the masks did prune, for most of the run
