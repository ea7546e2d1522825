"""Checkpoints: one dict, written atomically, holding everything a resumed run needs."""

from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_torch_save

__all__ = ["CKPT_NAME", "trainable_state", "load_trainable_state", "rng_state", "set_rng_state", "save", "load"]

CKPT_NAME = "checkpoint.pt"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (adapters, heads; everything for full fine-tuning)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise ValueError(f"checkpoint: parameters not in the model: {missing[:3]}")
    for n, v in state.items():
        if params[n].shape != v.shape:
            raise ValueError(f"checkpoint: shape of {n} is {tuple(v.shape)}, model has {tuple(params[n].shape)}")
        params[n].copy_(v)


def rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save(out_dir: str, state: dict[str, Any]) -> str:
    path = os.path.join(out_dir, CKPT_NAME)
    atomic_torch_save(state, path)
    return path


def load(out_dir: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, CKPT_NAME)
    if not os.path.exists(path):
        return None
    return torch.load(path, map_location="cpu", weights_only=False)
