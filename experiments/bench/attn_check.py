"""Which attention call does a workload's forward make, eagerly and inside a CUDA-graph capture?

    python experiments/bench/attn_check.py [--workload W2]

Records the arguments of every `scaled_dot_product_attention` call (is an explicit mask passed, is
`is_causal` set) in one eager forward and in one forward captured into a CUDA graph, and prints both.
transformers decides per forward whether it can drop the causal mask and let SDPA use its causal
kernel; this shows whether that decision differs during a capture (bench.py's `floor+graph` is slower
than `floor` on W2; the profile puts the difference in the attention kernels).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="W2", choices=[w for w, x in bench.WORKLOADS.items() if x.task == "lm"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attn_check: needs a CUDA device")
    device = torch.device("cuda")
    wl = bench.WORKLOADS[args.workload]
    model = bench.build_model(wl, False, device)
    for q in model.parameters():
        q.requires_grad_(False)
    batch = bench.make_batch(wl, model.config.vocab_size, wl.batch, device)
    calls: Counter = Counter()
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        mask = k.get("attn_mask", a[3] if len(a) > 3 else None)
        calls[(torch.cuda.is_current_stream_capturing(), mask is not None, bool(k.get("is_causal", False)))] += 1
        return real(*a, **k)

    F.scaled_dot_product_attention = spy
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            model(**batch)  # eager (also the warm-up before the capture)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(**batch)
    finally:
        F.scaled_dot_product_attention = real
    out = [{"capturing": c, "explicit_mask": m, "is_causal": ic, "calls": n} for (c, m, ic), n in sorted(calls.items())]
    print(json.dumps({"workload": wl.name, "transformers": bench._version("transformers"), "sdpa_calls": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
