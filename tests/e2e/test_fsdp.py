"""train.distributed=fsdp on CPU: 2 processes with the gloo backend (FSDP2's fully_shard), as torchrun starts them.

One start-up of the two processes runs three trainings: an uninterrupted run, the same run killed during step 6,
and its resumption from the step-4 checkpoint. The pytest process runs the reference: one process, the same
global batch (rank r of the 2 takes rows r, r+2, ... of the same shuffled order), dropout off. Checked: the
frozen base is sharded (DTensor) while what trains is not; the masks (every masking event's ranks and the final
mask's kept triplets) equal the single process's exactly and are equal on both ranks (train.check_masks=true);
the loss curve matches within 1e-5; resuming equals the uninterrupted run; rank 0's export loads in PEFT and
computes what the single-process model does.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adarank.inject import adapters
from adarank.runner import distributed
from adarank.runner.cli import CONF_DIR, to_config

from . import capture_models, one_thread  # noqa: F401
from .test_ddp import _free_port

pytestmark = pytest.mark.usefixtures("one_thread")

#: train.max_steps=12 with adalora from rank 3 (1.5 r) down to 2: several masking events, and a shrink at the end
LOSS_TOL = 1e-5  # fp32 on a CPU: only the order of the gradient sums differs (measured ~1e-7)


def _overrides(out_dir: str, per_rank_batch: int) -> list[str]:
    return [
        "model=tiny_random", "task=tweets", "method=adalora", "method.r=2", "method.delta_t=1",
        "train.max_steps=12", f"train.batch_size={per_rank_batch}", "train.grad_accum=2", "train.eval_every=6",
        "train.checkpoint_every=4", "train.log_every=1", "train.progress=false",
        "+model.config_overrides.hidden_dropout_prob=0.0", "+model.config_overrides.attention_probs_dropout_prob=0.0",
        "data.max_train_samples=96", "data.max_eval_samples=32", "wandb.mode=disabled",
        f"data.cache_dir={out_dir}/cache",  # written atomically: the reference and the ranks may share it
    ]


def _config(out_dir: str, per_rank_batch: int, *extra: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_config(compose(config_name="config", overrides=[*_overrides(out_dir, per_rank_batch), *extra]))


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    import adarank.runner.train as train_mod
    from torch.distributed.tensor import DTensor

    real_apply = train_mod.apply_method
    kill_at: list[int | None] = [None]  # the training forward pass that raises KeyboardInterrupt
    seen = {}

    def spy(model, method, model_cfg):
        adapted = real_apply(model, method, model_cfg)
        seen["model"] = adapted.model
        calls = [0]

        def kill(module, args, kwargs):
            if module.training:
                calls[0] += 1
                if calls[0] == kill_at[0]:
                    raise KeyboardInterrupt

        adapted.model.register_forward_pre_hook(kill, with_kwargs=True)
        return adapted

    train_mod.apply_method = spy
    try:
        fsdp = ["train.distributed=fsdp", "train.check_masks=true"]
        out = {}
        for name, extra, kill in (("run", [], None), ("killed", [], 11), ("killed", ["resume=true"], None)):
            kill_at[0] = kill
            cfg = _config(out_dir, 4, *fsdp, *extra)
            try:
                res = train_mod.train(cfg, os.path.join(out_dir, name), log=lambda *a: None)
            except KeyboardInterrupt:  # the kill: during step 6 (forward 11 of 2 per step), after step 4's checkpoint
                out["killed_at_checkpoint"] = torch.load(os.path.join(out_dir, name, "checkpoint.pt"),
                                                         weights_only=False)["step"]
                continue
            out[name + "_masks"] = [res["allocation_events"], res["kept_triplets"]]  # this rank's: compared across ranks
            seen["model"].reshard()  # FSDP2 leaves the root unsharded after its forward (its backward comes next)
            params = dict(seen["model"].named_parameters())
            out[name + "_sharded"] = sorted(n for n, p in params.items() if isinstance(p, DTensor))
            out[name + "_trainable_dtensors"] = [n for n, p in params.items() if p.requires_grad and isinstance(p, DTensor)]
        with open(os.path.join(out_dir, f"worker{rank}.json"), "w") as f:
            json.dump(out, f)
    finally:
        distributed.teardown(info)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the folder where the 2 FSDP ranks trained, the single-process reference's results and model)."""
    out = tmp_path_factory.mktemp("fsdp")
    ctx = mp.start_processes(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False, start_method="spawn")
    # the reference trains here meanwhile: one process, batch 8 = the 2 ranks' 4 + 4
    mp_ = pytest.MonkeyPatch()
    models = capture_models(mp_)
    from adarank.runner.train import train

    train(_config(str(out), 8), str(out / "single"), log=lambda *a: None)
    mp_.undo()
    while not ctx.join():
        pass
    return out, json.loads((out / "single" / "results.json").read_text()), models[0]


def _res(out, name):
    return json.loads((out / name / "results.json").read_text())


def test_fsdp_shards_the_frozen_base_and_matches_one_process(trained):
    out, single, _ = trained
    w0, w1 = (json.loads((out / f"worker{r}.json").read_text()) for r in (0, 1))
    assert w0 == w1
    sharded = w0["run_sharded"]
    assert any(".attention.self.query.base.weight" in n for n in sharded)  # the blocks' frozen linear layers
    assert any("embeddings.word_embeddings" in n for n in sharded)  # the root's frozen weights
    assert w0["run_trainable_dtensors"] == []  # what trains stays replicated (ignored_params)
    run = _res(out, "run")
    # the masks, exactly: every masking event's ranks and the kept triplets of the final mask
    assert run["allocation_events"] == single["allocation_events"] and len(run["allocation_events"]["steps"]) > 3
    assert run["kept_triplets"] == single["kept_triplets"]
    assert run["final_ranks"] == single["final_ranks"] and run["budget_curve"] == single["budget_curve"]
    assert sum(run["final_ranks"].values()) == 2 * len(run["final_ranks"])  # from rank 3 to an average of 2
    assert run["trainable_params_final"] < run["trainable_params"]  # and the adapters were shrunk
    assert w0["run_masks"] == [run["allocation_events"], run["kept_triplets"]]  # rank 1's too (w0 == w1)
    a, b = [e["train/loss"] for e in run["train_log"]], [e["train/loss"] for e in single["train_log"]]
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL
    assert run["world_size"] == 2 and not (out / "run" / "checkpoint.pt").exists()


def test_fsdp_run_killed_and_resumed_equals_the_uninterrupted_one(trained):
    out, _, _ = trained
    w0 = json.loads((out / "worker0.json").read_text())
    assert w0["killed_at_checkpoint"] == 4
    want, got = _res(out, "run"), _res(out, "killed")
    for key in ("value", "metrics", "final_ranks", "budget_curve", "steps", "evals", "train_log",
                "allocation_events", "kept_triplets"):
        assert got[key] == want[key], key


def test_fsdp_export_loads_in_peft_and_computes_what_one_process_trained(trained):
    from peft import PeftModel

    out, _, single_model = trained
    base = copy.deepcopy(single_model)
    for name, layer in adapters(base):
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent), child, layer.base)
    torch.manual_seed(1)
    base.classifier.reset_parameters()  # PEFT must bring the head back from modules_to_save
    loaded = PeftModel.from_pretrained(base.eval(), str(out / "run" / "adapter")).eval()
    single_model.eval()
    ids = torch.randint(5, 50, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = single_model(input_ids=ids).logits, loaded(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
