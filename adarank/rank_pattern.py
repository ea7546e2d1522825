"""Per-module LoRA ranks ("where the rank goes"), separate from how the adapter is parameterised.

A pattern is `{module name: rank}`; rank 0 leaves a module unadapted. It comes from a finished adaptive run
(`results.json`'s `final_ranks`, or the `rank_pattern` of an exported `adapter/`) or is given inline, and
the control transforms (`shuffle`, `uniform`, `reverse_layers`) turn a learned pattern into its controls.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Mapping, Sequence

__all__ = ["load_rank_pattern", "resolve_ranks", "shuffle", "uniform", "reverse_layers", "TRANSFORMS", "transform"]

_LAYER = re.compile(r"\.(\d+)\.")


def load_rank_pattern(source: str | Mapping[str, int]) -> dict[str, int]:
    """The pattern in `source`: an inline mapping, a run folder or its results.json, or an exported adapter
    folder or its adapter_config.json. Raises ValueError naming method.rank_pattern."""
    if isinstance(source, Mapping):
        return _checked({str(k): v for k, v in source.items()})
    path = source
    if os.path.isdir(path):
        for name in ("results.json", "adapter_config.json", os.path.join("adapter", "adapter_config.json")):
            if os.path.isfile(os.path.join(path, name)):
                path = os.path.join(path, name)
                break
    if not os.path.isfile(path):
        raise ValueError(f"method.rank_pattern: {source!r} is no results.json, adapter folder or adapter_config.json")
    with open(path) as f:
        data = json.load(f)
    if "final_ranks" in data and data["final_ranks"]:
        return _checked(dict(data["final_ranks"]))
    if "rank_pattern" in data:
        # export_peft escapes dots and leaves rank-0 modules out; they stay unadapted here too
        return _checked({k.replace("\\.", "."): v for k, v in data["rank_pattern"].items()})
    raise ValueError(f"method.rank_pattern: {path} holds neither final_ranks nor rank_pattern")


def _checked(pattern: dict[str, int]) -> dict[str, int]:
    for name, r in pattern.items():
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ValueError(f"method.rank_pattern: rank of {name!r} must be an int >= 0, got {r!r}")
    return pattern


def resolve_ranks(names: Sequence[str], pattern: Mapping[str, int]) -> dict[str, int]:
    """The rank of each target module `names` (model order). A module the pattern does not name is at rank
    0 (an exported adapter leaves pruned modules out); a pattern entry that is no target is an error."""
    unknown = [n for n in pattern if n not in set(names)]
    if unknown:
        raise ValueError(f"method.rank_pattern: {', '.join(unknown[:3])} {'is' if len(unknown) == 1 else 'are'} "
                         "not among the adapted modules (method.targets / model.targets)")
    return {n: int(pattern.get(n, 0)) for n in names}


def _group(name: str, within: str | None) -> str:
    if within is None:
        return ""
    if within == "layer":
        m = _LAYER.search(name)
        return m.group(1) if m else ""
    if within == "type":
        return _LAYER.sub(".N.", name)
    raise ValueError(f"method.rank_pattern_within: must be null, layer or type, got {within!r}")


def shuffle(pattern: Mapping[str, int], seed: int, within: str | None = None) -> dict[str, int]:
    """The same multiset of ranks over the modules, permuted with `seed`; `within="type"` permutes only among
    modules of one matrix type (query of every layer), `within="layer"` only inside each layer."""
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for n in pattern:
        groups.setdefault(_group(n, within), []).append(n)
    out = dict(pattern)
    for members in groups.values():
        ranks = [pattern[n] for n in members]
        rng.shuffle(ranks)
        out.update(zip(members, ranks))
    return out


def uniform(pattern: Mapping[str, int]) -> dict[str, int]:
    """The same total rank spread evenly: every module gets ⌊total/n⌋, the first `total mod n` one more."""
    names = list(pattern)
    total = sum(pattern.values())
    base, extra = divmod(total, max(len(names), 1))
    return {n: base + (1 if i < extra else 0) for i, n in enumerate(names)}


def reverse_layers(pattern: Mapping[str, int]) -> dict[str, int]:
    """Layer i's ranks go to layer L-1-i, matrix type by matrix type (names without a layer index stay)."""
    layers = sorted({int(m.group(1)) for n in pattern if (m := _LAYER.search(n))})
    flip = dict(zip(layers, reversed(layers)))
    out = dict(pattern)
    for n in pattern:
        m = _LAYER.search(n)
        if m:
            src = n[:m.start()] + f".{flip[int(m.group(1))]}." + n[m.end():]
            if src in pattern:
                out[n] = pattern[src]
    return out


TRANSFORMS = ("shuffle", "uniform", "reverse_layers")


def transform(pattern: Mapping[str, int], name: str | None, seed: int = 0, within: str | None = None) -> dict[str, int]:
    """Apply the control `name` (one of TRANSFORMS, or None for the pattern as it is)."""
    if name is None:
        return dict(pattern)
    if name == "shuffle":
        return shuffle(pattern, seed, within)
    if name == "uniform":
        return uniform(pattern)
    if name == "reverse_layers":
        return reverse_layers(pattern)
    raise ValueError(f"method.rank_pattern_transform: must be one of {TRANSFORMS} or null, got {name!r}")
