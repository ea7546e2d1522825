"""The DDP code path on CPU: 2 processes with the gloo backend, as torchrun would start them.

Checks that the allocator sees the averaged gradients on every rank and that the masks are identical on
all ranks at every step (train.check_masks=true makes the loop verify it with a collective and raise
otherwise), that both ranks end with the same ranks and metrics, that only rank 0 writes, and that
train.gradient_checkpointing=true changes none of it.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from adarank.runner import distributed
from adarank.runner.cli import CONF_DIR, to_config

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "runner", "data", "fixtures", "glue")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out_dir: str) -> list[str]:
    return [
        "model=tiny_random", "task=tweets", "method=adalora", "method.r=2", "method.delta_t=1",
        "train.max_steps=12", "train.batch_size=8", "train.grad_accum=2", "train.eval_every=6",
        "train.checkpoint_every=6", "train.check_masks=true", "train.progress=false",
        "data.max_train_samples=256", "data.max_eval_samples=64", "wandb.mode=disabled",
        f"data.cache_dir={out_dir}/cache",
    ]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    try:
        if fn == "train":
            from adarank.runner.train import train

            # the run, then the same run with gradient checkpointing (in the same processes: no second start-up)
            for name, extra in (("run", []), ("run_ckpt", ["train.gradient_checkpointing=true"])):
                GlobalHydra.instance().clear()
                with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                    cfg = to_config(compose(config_name="config", overrides=[*_overrides(out_dir), *extra]))
                res = train(cfg, os.path.join(out_dir, name), log=lambda *a: None)
                keep = ("final_ranks", "value", "best_value", "budget_curve", "steps", "train_log")
                with open(os.path.join(out_dir, f"{name}_rank{rank}.json"), "w") as f:
                    json.dump({k: res[k] for k in keep}, f)
        else:  # the check itself must be able to fail
            try:
                distributed.check_equal(info, torch.tensor([float(rank)]), "probe")
                outcome = "passed"
            except RuntimeError as e:
                outcome = str(e)
            with open(os.path.join(out_dir, f"probe{rank}.txt"), "w") as f:
                f.write(outcome)
    finally:
        distributed.teardown(info)


def _spawn(tmp_path, fn: str) -> None:
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), fn), nprocs=2, join=True, start_method="spawn")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The folder where both ranks trained: without (run/) and with gradient checkpointing (run_ckpt/)."""
    out = tmp_path_factory.mktemp("ddp")
    _spawn(out, "train")
    return out


def _results(out, name: str) -> tuple[dict, dict]:
    return tuple(json.loads((out / f"{name}_rank{r}.json").read_text()) for r in (0, 1))


def test_two_ranks_reach_identical_masks_and_only_rank0_writes(trained):
    tmp_path = trained
    r0, r1 = _results(trained, "run")
    assert r0 == r1  # same ranks, metrics and budget curve on both ranks
    assert r0["steps"] == 12 and sum(r0["final_ranks"].values()) == 2 * len(r0["final_ranks"])
    run = tmp_path / "run"
    assert (run / "results.json").exists() and (run / "adapter" / "adapter_config.json").exists()
    assert not (run / "checkpoint.pt").exists()  # removed by rank 0 once the run finished


def test_mask_check_detects_ranks_that_differ(tmp_path):
    _spawn(tmp_path, "probe")
    for r in (0, 1):
        assert "differs between rank 0 and rank 1" in (tmp_path / f"probe{r}.txt").read_text()


def test_gradient_checkpointing_under_ddp_gives_the_same_run(trained):
    """train.gradient_checkpointing=true with 2 gloo processes: the recomputation runs inside DDP's backward
    (its gradient hooks fire on the recomputed graph; DDP's no_sync on the first micro-batch of each step),
    and both ranks reach the same masks, ranks, metrics and losses, bit for bit, as without it
    (train.check_masks=true also checks the masks across ranks at every step)."""
    plain, ckpt = _results(trained, "run"), _results(trained, "run_ckpt")
    assert ckpt[0] == ckpt[1] == plain[0]
    assert ckpt[0]["steps"] == 12 and sum(ckpt[0]["final_ranks"].values()) == 2 * len(ckpt[0]["final_ranks"])
