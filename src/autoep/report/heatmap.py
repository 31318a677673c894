"""``expert_load.png``: how each layer's tokens spread over its experts, step by step.

Colors are load relative to the layer's mean at that step (a diverging map
centred on 1.0): a fair expert is white, a hot one red, a starved one blue,
so collapse or recovery reads at a glance for any batch size or top-k.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from autoep.errors import ConfigError
from autoep.report.load import RunData
from autoep.report.summary import shares

MAX_COLUMNS = 400  # more steps than this are summed into bins: a PNG cannot show more anyway


def bin_steps(steps: list[int], load_SLE: torch.Tensor, max_columns: int = MAX_COLUMNS):
    """Sum consecutive steps into at most ``max_columns`` bins.

    Returns ``(edges, load_CLE)``: ``C + 1`` x-axis edges (half a step outside
    each bin's first and last step) and the summed loads. Summing counts, not
    averaging shares, keeps each bin's share an honest count/mean.
    """
    S = load_SLE.shape[0]
    width = max(1, math.ceil(S / max_columns))
    starts = list(range(0, S, width))
    load_CLE = torch.stack([load_SLE[s : s + width].sum(dim=0) for s in starts])
    edges = [steps[s] - 0.5 for s in starts] + [steps[-1] + 0.5]
    return edges, load_CLE


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            'the load heatmap needs matplotlib: pip install matplotlib (or pip install "autoep[report]")'
        ) from None
    matplotlib.use("Agg")  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    return plt


def plot_load(run: RunData, path: str | Path, window: int) -> Path:
    """Write the heatmap PNG to ``path``: one panel per MoE layer, then the final-window state."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    load_SLE = run.stacked("expert_load")
    S, L, E = load_SLE.shape
    k = max(1, min(window, S))
    edges, load_CLE = bin_steps(run.steps, load_SLE)
    share_CLE = shares(load_CLE.reshape(-1, E)).reshape(load_CLE.shape)
    final_LE = shares(load_SLE[-k:].sum(dim=0))
    bias = next((r["expert_bias"] for r in reversed(run.records) if r.get("expert_bias")), None)
    vmax = max(2.0, float(share_CLE.max()), float(final_LE.max()))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    cmap = "RdBu_r"

    panel_h = min(3.0, max(1.4, 0.12 * E))
    final_h = min(6.0, max(1.6, 0.25 * L + 0.8))
    fig = plt.figure(figsize=(12, panel_h * L + final_h + 0.8), layout="constrained")
    grid = fig.add_gridspec(L + 1, 2 if bias is not None else 1, height_ratios=[panel_h] * L + [final_h])
    axes = []
    mesh = None
    y_edges = [e - 0.5 for e in range(E + 1)]
    for layer, name in enumerate(run.layer_names):
        ax = fig.add_subplot(grid[layer, :])
        mesh = ax.pcolormesh(edges, y_edges, share_CLE[:, layer].T.numpy(), cmap=cmap, norm=norm, shading="flat")
        ax.set_ylim(E - 0.5, -0.5)  # expert 0 on top, like the final panel's columns read left to right
        ax.set_title(name, loc="left", fontsize=8)  # a two-line y label would collide with the next panel's
        ax.set_ylabel("expert", fontsize=8)
        if E <= 16:
            ax.set_yticks(range(E))
        ax.tick_params(labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if layer < L - 1:
            ax.tick_params(labelbottom=False)
        axes.append(ax)
    binned = f", {math.ceil(S / MAX_COLUMNS)} steps per column" if S > MAX_COLUMNS else ""
    axes[-1].set_xlabel(f"step{binned}")

    ax = fig.add_subplot(grid[L, 0])
    ax.imshow(final_LE.numpy(), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_title(f"final window: steps {run.steps[-k]}-{run.steps[-1]}", fontsize=9)
    ax.set_xlabel("expert")
    ax.set_yticks(range(L), [_short(n) for n in run.layer_names], fontsize=7)
    ax.tick_params(labelsize=7)
    axes.append(ax)
    if bias is not None:
        bias_LE = torch.tensor(bias, dtype=torch.float64)
        ax = fig.add_subplot(grid[L, 1])
        axes.append(ax)
        limit = max(float(bias_LE.abs().max()), 1e-12)
        image = ax.imshow(
            bias_LE.numpy(), cmap="PuOr_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest"
        )
        ax.set_title("router selection bias (last step)", fontsize=9)
        ax.set_yticks(range(L), [_short(n) for n in run.layer_names], fontsize=7)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, location="bottom", label="bias", shrink=0.6)  # the right edge has the load bar
    fig.colorbar(mesh, ax=axes, label="load / mean load", shrink=0.9)
    model = f"{run.model_name}: " if run.model_name else ""
    fig.suptitle(f"{model}expert load relative to the mean, steps {run.steps[0]}-{run.steps[-1]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]
