"""Pictures people would rather look at than read: orthogonal mid-slice montages and loss curves, as PNG."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from scripts.storage import atomic_write

__all__ = ["label_overlay_grid", "mid_slices", "montage", "plot_curves", "sample_grid"]

VIEWS = ("axial", "coronal", "sagittal")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices of a RAS volume ``(X, Y, Z)`` (or ``(1, X, Y, Z)``), oriented for
    display in radiological-viewer fashion: anterior/superior up."""
    v = np.asarray(volume, dtype=np.float32)
    if v.ndim == 4:
        v = v[0]
    x, y, z = (s // 2 for s in v.shape)
    axial = np.flipud(v[:, :, z].T)  # rows: posterior->anterior flipped so anterior is up
    coronal = np.flipud(v[:, y, :].T)  # rows: inferior->superior flipped so superior is up
    sagittal = np.flipud(v[x, :, :].T)
    return [axial, coronal, sagittal]


def montage(
    rows: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike | None = None,
    title: str | None = None,
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
) -> np.ndarray:
    """Draw one row of orthogonal mid-slices per volume; write it as PNG when ``path`` is given.

    Args:
        rows: (name, volume) pairs, volumes ``(X, Y, Z)`` or ``(1, X, Y, Z)`` in RAS orientation.
        path: PNG destination (written atomically).
        title: figure title.
        vmin: lower end of the grey scale (``None``: per-image).
        vmax: upper end of the grey scale.

    Returns:
        The figure as an ``(H, W, 3)`` uint8 array (for TensorBoard's ``add_image``).
    """
    plt = _pyplot()
    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    fig, axes = plt.subplots(len(items), 3, figsize=(7.5, 2.6 * len(items) + (0.4 if title else 0)), squeeze=False)
    for r, (name, volume) in enumerate(items):
        for c, (view, img) in enumerate(zip(VIEWS, mid_slices(volume), strict=True)):
            ax = axes[r][c]
            ax.imshow(img, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view, fontsize=9)
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return rgb


def _tile(volume: np.ndarray) -> np.ndarray:
    """The three mid-slices of one volume side by side, padded to a common height: ``(H, 3 W)``."""
    slices = mid_slices(volume)
    height = max(s.shape[0] for s in slices)
    padded = [np.pad(s, ((0, height - s.shape[0]), (0, 1))) for s in slices]
    return np.concatenate(padded, axis=1)


def sample_grid(
    items: Sequence[tuple[str, np.ndarray]],
    path: str | os.PathLike,
    title: str | None = None,
    vmin: float = 0.0,
    vmax: float = 1.0,
    columns: int | None = None,
    tile_inches: float = 3.6,
) -> np.ndarray:
    """Draw many volumes as a grid that fits one screen: each cell holds one volume's axial, coronal and sagittal
    mid-slices side by side (anterior/superior up), labelled; ``columns`` default ``ceil(sqrt(n))`` capped at 6
    (16 samples: 4 x 4 cells, about 1500 x 700 pixels). Written atomically as PNG.

    Args:
        items: (label, volume) pairs, volumes ``(X, Y, Z)`` or ``(1, X, Y, Z)`` in RAS orientation.
        path: PNG destination.
        title: figure title.
        vmin, vmax: grey-scale window shared by every cell.
        columns: cells per row.
        tile_inches: width of one cell in inches (100 dpi).

    Returns:
        The figure as an ``(H, W, 3)`` uint8 array.
    """
    plt = _pyplot()
    items = list(items)
    n = len(items)
    columns = columns or min(6, max(1, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / columns))
    tiles = [_tile(v) for _, v in items]
    aspect = tiles[0].shape[0] / tiles[0].shape[1]
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(tile_inches * columns,
                                      (tile_inches * aspect + 0.25) * rows + (0.4 if title else 0)))
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k < n:
            ax.imshow(tiles[k], cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(items[k][0], fontsize=8, pad=2)
    if title:
        fig.suptitle(f"{title}  (each cell: axial | coronal | sagittal)", fontsize=10)
    fig.tight_layout(pad=0.3)
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return rgb


def label_overlay_grid(
    items: Sequence[tuple[str, np.ndarray, np.ndarray]],
    path: str | os.PathLike,
    classes: Mapping[int, str],
    title: str | None = None,
    columns: int | None = None,
    tile_inches: float = 3.6,
) -> np.ndarray:
    """:func:`sample_grid` with label contours: each cell holds one image's mid-slices with the outline of each class
    of its label map drawn over them (one colour per class, legend below). Written atomically as PNG.

    Args:
        items: (title, image, label) triples, ``(X, Y, Z)`` or ``(1, X, Y, Z)`` RAS volumes on the same grid.
        path: PNG destination.
        classes: ``{label value: class name}``.
        title: figure title.
        columns: cells per row (default ``ceil(sqrt(n))`` capped at 6).
        tile_inches: width of one cell in inches.
    """
    plt = _pyplot()
    items = list(items)
    n = len(items)
    columns = columns or min(6, max(1, int(np.ceil(np.sqrt(n)))))
    rows = int(np.ceil(n / columns))
    colours = plt.get_cmap("tab10")
    tiles = [(_tile(image), _tile(label)) for _, image, label in items]
    aspect = tiles[0][0].shape[0] / tiles[0][0].shape[1]
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(tile_inches * columns,
                                      (tile_inches * aspect + 0.25) * rows + 0.4 + (0.4 if title else 0)))
    for k, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if k >= n:
            continue
        image, label = tiles[k]
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        for c, value in enumerate(classes):
            mask = np.round(label) == int(value)
            if mask.any():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colours(c % 10)], linewidths=0.7)
        ax.set_title(items[k][0], fontsize=8, pad=2)
    handles = [plt.Line2D([0], [0], color=colours(c % 10), lw=2) for c in range(len(classes))]
    fig.legend(handles, list(classes.values()), loc="lower center", ncol=max(1, len(classes)), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(f"{title}  (each cell: axial | coronal | sagittal; label outlines)", fontsize=10)
    fig.tight_layout(pad=0.3, rect=(0, 0.05, 1, 1))
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return rgb


def plot_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike, title: str = "", xlabel: str = "epoch"
) -> None:
    """Plot named ``(x, y)`` curves on a log-scaled y axis where all values are positive, and write a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    positive = True
    for name, points in curves.items():
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        positive &= min(ys) > 0
        ax.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None)
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
