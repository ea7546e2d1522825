"""The DDP code path on CPU: 2 processes with the gloo backend, as torchrun would start them.

Checks that the allocator sees the averaged gradients on every rank and that the masks are identical on
all ranks at every step (train.check_masks=true makes the loop verify it with a collective and raise
otherwise), that both ranks end with the same ranks and metrics, and that only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import socket

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


#: the checkpointing case, shorter: 6 steps (still 2 micro-batches each, so DDP's no_sync runs too) on less
#: data, one evaluation
CKPT_RUN = ["train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=0", "train.log_every=1",
            "data.max_train_samples=64", "data.max_eval_samples=16"]


def _worker(rank: int, world: int, port: int, out_dir: str, fn: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.setup("cpu")
    try:
        if fn == "train":
            from adarank.runner.train import train

            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = to_config(compose(config_name="config", overrides=_overrides(out_dir)))
            res = train(cfg, os.path.join(out_dir, "run"), log=lambda *a: None)
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump({k: res[k] for k in ("final_ranks", "value", "best_value", "budget_curve", "steps")}, f)
        elif fn == "ckpt":  # the same shorter run without, then with gradient checkpointing
            from adarank.runner.train import train

            out = {}
            for ckpt in ("false", "true"):
                GlobalHydra.instance().clear()
                with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                    cfg = to_config(compose(config_name="config", overrides=[
                        *_overrides(out_dir), *CKPT_RUN, f"train.gradient_checkpointing={ckpt}"]))
                res = train(cfg, os.path.join(out_dir, f"ckpt_{ckpt}"), log=lambda *a: None)
                out[ckpt] = {k: res[k] for k in ("final_ranks", "value", "budget_curve", "steps")}
                out[ckpt]["losses"] = [e["train/loss"] for e in res["train_log"]]
            with open(os.path.join(out_dir, f"ckpt{rank}.json"), "w") as f:
                json.dump(out, f)
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


def test_two_ranks_reach_identical_masks_and_only_rank0_writes(tmp_path):
    _spawn(tmp_path, "train")
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1  # same ranks, metrics and budget curve on both ranks
    assert r0["steps"] == 12 and sum(r0["final_ranks"].values()) == 2 * len(r0["final_ranks"])
    run = tmp_path / "run"
    assert (run / "results.json").exists() and (run / "adapter" / "adapter_config.json").exists()
    assert not (run / "checkpoint.pt").exists()  # removed by rank 0 once the run finished


def test_mask_check_detects_ranks_that_differ(tmp_path):
    _spawn(tmp_path, "probe")
    for r in (0, 1):
        assert "differs between rank 0 and rank 1" in (tmp_path / f"probe{r}.txt").read_text()


def test_gradient_checkpointing_under_ddp_gives_the_same_masks_and_losses(tmp_path):
    """train.gradient_checkpointing=true with 2 gloo processes: the recomputation runs inside DDP's backward
    (its gradient hooks fire on the recomputed graph), and every rank reaches the same masks, ranks and
    losses, bit for bit, as without it (train.check_masks=true checks the masks across ranks at every step)."""
    _spawn(tmp_path, "ckpt")
    r0 = json.loads((tmp_path / "ckpt0.json").read_text())
    r1 = json.loads((tmp_path / "ckpt1.json").read_text())
    assert r0 == r1
    assert r0["true"] == r0["false"]
    assert r0["true"]["steps"] == 6 and len(r0["true"]["losses"]) == 6
    assert sum(r0["true"]["final_ranks"].values()) == 2 * len(r0["true"]["final_ranks"])
