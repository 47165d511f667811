"""Figures of ``badm-train``: learning curves and generated samples (matplotlib, Agg canvas).

The functions draw on a :class:`matplotlib.figure.Figure` (no pyplot, no global backend
switch) and write PNG bytes to a file object, so the caller decides how files are written.
"""

from __future__ import annotations

from typing import BinaryIO

__all__ = ["METRIC_LABELS", "curves_figure", "plot_curves", "plot_samples"]

METRIC_LABELS = {
    "test_accuracy": "test accuracy (fraction correct)",
    "test_bpc": "test loss (bits per character)",
    "test_neg_elbo": "test negative ELBO (nats per image)",
}

# one look per optimizer, distinct even in grey and where curves coincide (markers at offsets)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)))
_MARKS_PER_LINE = 12


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _task_attribute(task: str, name: str):
    """An attribute of ``badm_fast.train.tasks.TASKS[task]`` (for results.json files written before it was recorded)."""
    from badm_fast.train import tasks

    return getattr(tasks.TASKS.get(task), name, None)


def _title(results: dict) -> str:
    """What ran: task, examples (and the subset), batch, step caps, sub-batches, epochs, seed."""
    cfg, data = results["config"], results["data"]
    data = dict(data, source=data.get("source") or _task_attribute(cfg["task"], "source"))
    parts = [f"{data['n_train']} training / {data.get('n_test', '?')} test examples"]
    if cfg.get("subset") is not None:
        parts[0] += f" (--subset {cfg['subset']})"
    parts.append(f"batch {cfg['batch_size']}" if cfg["batch_size"] > 0 else "full batch")
    if cfg.get("max_steps_per_epoch") is not None:
        parts.append(f"at most {cfg['max_steps_per_epoch']} steps per epoch (--max-steps-per-epoch)")
    mode = " (merged)" if cfg.get("badm_mode") == "merged" else ""
    parts.append(f"{cfg['sub_batches']} BADM sub-batches{mode}")
    unit = "full-batch steps" if cfg["batch_size"] == 0 else "epochs"
    parts.append(f"{cfg['epochs']} {unit}")
    parts.append(f"seed {cfg['seed']}")
    if cfg.get("threads") is not None:
        parts.append(f"{cfg['threads']} torch thread" + ("" if cfg["threads"] == 1 else "s"))
    head = f"badm-train --task {cfg['task']}" + (f": {data['source']}" if data.get("source") else "")
    return head + "\n" + ", ".join(parts)


def curves_figure(results: dict):
    """The 2x2 learning curves of a ``results.json`` dictionary as a matplotlib Figure.

    Panels: training loss and test metric against epochs (top; full-batch steps for a
    full-batch task such as ``graph``), and against cumulative training seconds (bottom); one
    line per optimizer, each with its own line style and markers so that coinciding curves stay
    distinguishable. The metric panels start at the shared initial weights (epoch 0, second 0);
    every axis includes every point and carries its unit; the legend sits outside the panels.
    """
    from matplotlib.ticker import MaxNLocator

    cfg = results["config"]
    metric = results["metric"]["name"]
    metric_label = METRIC_LABELS.get(metric, metric)
    loss_unit = results.get("data", {}).get("loss_unit") or _task_attribute(cfg["task"], "loss_unit")
    loss_label = f"training loss ({loss_unit})" if loss_unit else "training loss"
    full_batch = cfg["batch_size"] == 0
    step_label = "full-batch step" if full_batch else "epoch"

    fig = _figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    log_loss = True
    runs = list(results["optimizers"].items())
    for i, (name, run) in enumerate(runs):
        epochs = [e["epoch"] for e in run["epochs"]]
        seconds = [e["time_s"] for e in run["epochs"]]
        loss = [e["train_loss"] for e in run["epochs"]]
        value = [e["test_metric"] for e in run["epochs"]]
        # the metric of the shared initial weights, at epoch 0 / second 0
        m_epochs, m_seconds, m_value = [0, *epochs], [0.0, *seconds], [run["initial_metric"], *value]
        if loss:
            log_loss = log_loss and min(loss) > 0 and max(loss) / min(loss) > 30  # log axis only for a wide range
        label = f"{name} (diverged in epoch {run.get('diverged_at_epoch')})" if run.get("diverged") else name
        n = max(len(m_epochs), 1)
        every = max(1, n // _MARKS_PER_LINE)
        start = (i * every) // len(runs)  # staggered per optimizer: markers of coinciding curves stay apart
        style = dict(
            label=label,
            linestyle=_LINESTYLES[i % len(_LINESTYLES)],
            marker=_MARKERS[i % len(_MARKERS)],
            markevery=(start, every),
            markersize=5,
            markerfacecolor="none" if i % 2 else None,
            linewidth=1.6,
            color=f"C{i % 10}",
        )
        axes[0, 0].plot(epochs, loss, **style)
        axes[0, 1].plot(m_epochs, m_value, **style)
        axes[1, 0].plot(seconds, loss, **style)
        axes[1, 1].plot(m_seconds, m_value, **style)
    for row, xlabel in ((0, step_label), (1, "training time (s)")):
        axes[row, 0].set_ylabel(loss_label)
        axes[row, 1].set_ylabel(metric_label)
        for ax in axes[row]:
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
        if log_loss:
            axes[row, 0].set_yscale("log")
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.flat:
        _include_every_point(ax)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title="optimizer")
    fig.suptitle(_title(results))
    return fig


def _include_every_point(ax) -> None:
    """Data limits from the lines themselves, starting at the first point (never cropped)."""
    import math

    xs = [x for line in ax.get_lines() for x in line.get_xdata() if math.isfinite(x)]
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if math.isfinite(y)]
    if not xs or not ys:
        return
    lo, hi = min(xs), max(xs)
    pad = 0.02 * (hi - lo) or 0.5
    ax.set_xlim(lo - pad, hi + pad)
    lo, hi = min(ys), max(ys)
    if ax.get_yscale() == "log":
        ax.set_ylim(lo / 1.15, hi * 1.15)
    else:
        pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
        ax.set_ylim(lo - pad, hi + pad)


def plot_curves(results: dict, out: BinaryIO) -> None:
    """Writes :func:`curves_figure` of a ``results.json`` dictionary as PNG to ``out``."""
    curves_figure(results).savefig(out, format="png", dpi=100)


def plot_samples(samples: dict, out: BinaryIO, title: str = "") -> None:
    """Writes one grid of generated images per optimizer as PNG to ``out``.

    Args:
        samples: optimizer name -> tensor or array of shape (n, h, w) with values in [0, 1].
    """
    import numpy as np

    names = list(samples)
    fig = _figure(figsize=(3.2 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        imgs = np.asarray(samples[name], dtype=np.float32)
        n, h, w = imgs.shape
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        grid = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1), dtype=np.float32)
        for i in range(n):
            r, c = divmod(i, cols)
            grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = imgs[i]
        ax.imshow(grid, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(name)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.savefig(out, format="png", dpi=100)
