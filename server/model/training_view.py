"""A trainable view of the served backbone: the same weights, in a module tree of its own.

An adaptation job (`server.http.jobs`) trains a new task's adapter on the backbone the engine serves, without
a second copy of its weights and without touching the modules the engine runs. `training_view` gives a copy of
the model's module tree whose every parameter and buffer is the served tensor itself; only the module objects
are new, so switching the view to training mode or injecting MHR layers into it leaves the served model as it
is. The slot-reading linears (`BatchedLoRALinear`) become their frozen base layers again: an nn.Linear, or a
`PanelLinear` (packed weights, differentiable in its input), which `mhr.inject` wraps like any linear layer.
The view's forward is the model's own transformers forward; its tensors are read only, so the engine may run
steps on the same weights in between (never at the same time: `server.engine.core.Engine.between_steps`).
"""

from __future__ import annotations

import copy

from torch import nn

from server.model.layers import BatchedLoRALinear


def training_view(model: nn.Module) -> nn.Module:
    """A module tree like `model`'s sharing all its tensors, with its slot-reading linears unwrapped."""
    if isinstance(model, BatchedLoRALinear):
        return training_view(model.base)
    view = copy.copy(model)
    # the module's own containers (parameters, buffers, submodules, hooks) are copied, their tensors shared
    view.__dict__ = {key: copy.copy(value) if isinstance(value, dict | set) else value
                     for key, value in model.__dict__.items()}
    view._modules = {name: None if child is None else training_view(child) for name, child in model._modules.items()}
    return view
