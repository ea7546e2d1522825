"""`train.gradient_checkpointing`: each transformer block keeps only its input for backward and recomputes
its activations there, trading one more forward pass for the memory of the blocks' activations.

It changes memory, not the computation: the recomputation runs the same operations on the same inputs, with
the RNG state of the forward restored (dropout draws the same masks), so every gradient the loop reads,
the allocator's gradients of P, λ and Q included, is the one it would be without it. Non-reentrant
checkpointing (`use_reentrant=False`) is what makes that hold with frozen weights: the recomputed graph
reaches the adapters inside a block whether or not the block's input requires grad, so no input needs to.
"""

from __future__ import annotations

from torch import nn

__all__ = ["FIELD", "check_supported", "enable_gradient_checkpointing"]

FIELD = "train.gradient_checkpointing"


def check_supported(model: nn.Module) -> None:
    """A ValueError naming the field if transformers cannot checkpoint this model's class (MPNet, for one):
    callable on the meta-device model of the preflight, before any weights load."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{FIELD}: {type(model).__name__} does not support it (transformers' "
                         "supports_gradient_checkpointing is False for this architecture); set it to false")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Checkpoint every transformer block of `model` (a transformers model), non-reentrantly, in training
    mode; call before adapters wrap it (the blocks hold the switch, so adapters injected or shrunk inside
    them later are checkpointed too)."""
    check_supported(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the older name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # transformers also hooks the input embeddings so that their output requires grad: the workaround that
    # reentrant checkpointing needs. Without it backward would also compute the gradient of the embedding
    # output, which nothing trained reads (a trained embedding requires grad by itself).
    model.disable_input_require_grads()
    if getattr(model.config, "use_cache", False):  # training fills no KV cache; the blocks would switch it
        model.config.use_cache = False  # off themselves, with a log line
