"""Bridges from adarank to other training loops. The core never imports these.

`trainer.AdaRankCallback` drives the rank allocator inside `transformers.Trainer` and the trainers built on it
(TRL's `SFTTrainer`); `adarank.AdaRankCallback` imports it on first use.
"""
