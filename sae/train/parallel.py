"""The module DistributedDataParallel wraps in training: the SAE's training loss behind forward()."""
from __future__ import annotations

import torch


class LossModule(torch.nn.Module):
    """Puts training_loss behind forward(), which is what DistributedDataParallel wraps."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x_input, x_target, ctx):
        return self.sae.training_loss(x_input, x_target, ctx)


def loss_module(model, device: torch.device, distributed_enabled: bool) -> torch.nn.Module:
    """LossModule(model), wrapped in DistributedDataParallel under torchrun. The unused-parameter search (an
    extra pass over the graph every step) only where the variant does not promise that every parameter gets
    a gradient every step (class flag all_parameters_used: the TopK family)."""
    module = LossModule(model)
    if not distributed_enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False,
                                   find_unused_parameters=not getattr(model, "all_parameters_used", False))
