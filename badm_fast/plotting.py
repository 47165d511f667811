"""Figures of ``badm-train``: learning curves and generated samples (matplotlib, Agg canvas).

The functions draw on a :class:`matplotlib.figure.Figure` (no pyplot, no global backend
switch) and write PNG bytes to a file object, so the caller decides how files are written.
"""

from __future__ import annotations

from typing import BinaryIO

__all__ = ["METRIC_LABELS", "plot_curves", "plot_samples"]

METRIC_LABELS = {
    "test_accuracy": "test accuracy",
    "test_bpc": "test bits per character",
    "test_neg_elbo": "test negative ELBO (nats per image)",
}


def _figure(**kwargs):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_curves(results: dict, out: BinaryIO) -> None:
    """Writes the 2x2 learning curves of a ``results.json`` dictionary as PNG to ``out``.

    Panels: training loss and test metric against epochs (top), and against cumulative
    training seconds (bottom); one line per optimizer. The metric panels start at the shared
    initial weights (epoch 0) and are scaled to the values after the first tenth of training.
    """
    metric = results["metric"]["name"]
    label = METRIC_LABELS.get(metric, metric)
    fig = _figure(figsize=(11, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    log_loss = True
    late = []  # metric values after the first tenth of the epochs: the y range of the metric panels
    for name, run in results["optimizers"].items():
        epochs = [e["epoch"] for e in run["epochs"]]
        seconds = [e["time_s"] for e in run["epochs"]]
        loss = [e["train_loss"] for e in run["epochs"]]
        value = [e["test_metric"] for e in run["epochs"]]
        # the metric of the shared initial weights, at epoch 0 / second 0
        m_epochs, m_seconds, m_value = [0, *epochs], [0.0, *seconds], [run["initial_metric"], *value]
        late += value[len(value) // 10 :]
        if loss:
            log_loss = log_loss and min(loss) > 0 and max(loss) / min(loss) > 30  # log axis only for a wide range
        label_name = f"{name} (diverged)" if run.get("diverged") else name
        style = dict(marker="o" if len(epochs) <= 30 else None, markersize=3, linewidth=1.5, label=label_name)
        axes[0, 0].plot(epochs, loss, **style)
        axes[0, 1].plot(m_epochs, m_value, **style)
        axes[1, 0].plot(seconds, loss, **style)
        axes[1, 1].plot(m_seconds, m_value, **style)
    for row, xlabel in ((0, "epoch"), (1, "training time (s)")):
        axes[row, 0].set_ylabel("training loss")
        axes[row, 1].set_ylabel(label)
        for ax in axes[row]:
            ax.set_xlabel(xlabel)
            ax.grid(True, alpha=0.3)
            ax.legend()
        if log_loss:
            axes[row, 0].set_yscale("log")
        if late:  # zoom on where the optimizers differ; the shared starting point may fall outside
            lo, hi = min(late), max(late)
            pad = 0.15 * (hi - lo) or 0.05 * abs(hi) or 0.05
            axes[row, 1].set_ylim(lo - pad, hi + pad)
    cfg = results["config"]
    batch = f"batch {cfg['batch_size']}" if cfg["batch_size"] > 0 else "full batch"
    fig.suptitle(
        f"badm-train --task {cfg['task']}: {results['data']['n_train']} training examples, "
        f"{batch}, {cfg['sub_batches']} BADM sub-batches, seed {cfg['seed']}"
    )
    fig.savefig(out, format="png", dpi=100)


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
