"""Pictures of what routing learned: per-head task x skill weights, and how alike the tasks' routings are.

Only routed tasks have routing; dense tasks do not appear.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

import mhr


def module_weights(bundle: mhr.Bundle) -> Tensor:
    """Evaluation routing weights of the routed tasks in every module [M, T, h, K]."""
    if not bundle.routed_tasks():
        raise mhr.BundleError("the bundle has no routed tasks: there is no routing to show")
    return torch.stack([mhr.routing_weights(t.float()) for t in bundle.routing.values()])


def routing_table(bundle: mhr.Bundle) -> tuple[list[str], Tensor]:
    """The routed tasks' names and their routing weights averaged over modules [T, h, K]."""
    return bundle.routed_tasks(), module_weights(bundle).mean(dim=0)


def task_similarity(bundle: mhr.Bundle) -> Tensor:
    """Cosine similarity [T, T] of the routed tasks' weights over every module, head and skill."""
    flat = module_weights(bundle).transpose(0, 1).flatten(1)       # [T, M*h*K]
    flat = flat / flat.norm(dim=1, keepdim=True)
    return flat @ flat.T


def plot_routing(bundle: mhr.Bundle, path: str | Path) -> Path:
    """Write a PNG: one heatmap per head (tasks x skills, averaged over layers), then task similarity."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    names, weights = routing_table(bundle)
    similarity = task_similarity(bundle)
    T, h, K = weights.shape
    fig, axes = plt.subplots(1, h + 1, figsize=(2.2 * K * h / 4 + 0.3 * T + 3, 0.3 * T + 2), squeeze=False)
    for j, ax in enumerate(axes[0, :h]):
        image = ax.imshow(weights[:, j].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=float(weights.max()))
        ax.set_title(f"head {j}")
        ax.set_xlabel("skill")
        ax.set_xticks(range(K))
        ax.set_yticks(range(T), labels=names if j == 0 else [""] * T, fontsize=7)
    fig.colorbar(image, ax=axes[0, h - 1])  # one scale for every head
    ax = axes[0, h]
    image = ax.imshow(similarity.numpy(), cmap="magma", vmin=0, vmax=1)  # weights are >= 0: so is the cosine
    ax.set_title("task similarity (cosine)")
    ax.set_xticks(range(T), labels=names, rotation=90, fontsize=7)
    ax.set_yticks(range(T), labels=names, fontsize=7)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
