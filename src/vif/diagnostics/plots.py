"""Figures: per-layer ratio, violins, entropy, and heatmaps over the image (matplotlib, Agg).

Every function takes ``runs``: a list of ``(Collection, summary)`` pairs drawn on the same
axes - one for :func:`vif.diagnostics.diagnose`, base then VIF for
:func:`vif.diagnostics.compare`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm

# Figures are built with matplotlib's object API, never pyplot: nothing here touches the
# process-wide backend or figure registry of a user's notebook, and files need no display.
from matplotlib.figure import Figure

from .collect import Collection
from .stats import distribution, entropy

Run = tuple[Collection, dict]
COLORS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52")
FLOOR = 1e-4  # violins are on log10(Nv * p): smaller values (and zeros, -inf) are drawn at -4


def _injection_bands(ax: Axes, runs: list[Run]) -> None:
    """Shades the layers where any run's VIF injects."""
    layers = sorted({d for collection, _ in runs for d in collection.injection_layers})
    for i, d in enumerate(layers):
        ax.axvspan(
            d - 0.5,
            d + 0.5,
            color="#DD8452",
            alpha=0.12,
            zorder=0,
            lw=0,
            label="VIF injection layers" if i == 0 else None,
        )


def _deep_band(ax: Axes, runs: list[Run]) -> None:
    """Marks where the deep layers (the last half, averaged into ``deep_entropy``) start."""
    num_layers = runs[0][0].num_layers
    ax.axvline(num_layers // 2 - 0.5, color="0.4", ls=":", lw=1.2, label="deep layers start")


def _layer_axis(ax: Axes, runs: list[Run]) -> None:
    num_layers = runs[0][0].num_layers
    step = max(1, math.ceil(num_layers / 16))
    ax.set_xticks(range(0, num_layers, step))
    ax.set_xlim(-0.7, num_layers - 0.3)
    ax.set_xlabel("decoder layer")
    ax.grid(alpha=0.3)


def _num(x: float | None, digits: int) -> str:
    """``x`` rounded, or "n/a" (no deep layer among the analysed layers)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def _legend(ax: Axes) -> None:
    # Outside the axes, on the right: never covers a curve or a violin.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


def _title(runs: list[Run], what: str) -> str:
    rows = runs[0][1]["rows"]
    n = runs[0][1]["n_samples"]
    return f"{what}  ({n} samples, rows: {rows})"


def plot_ratio(runs: list[Run], path: Path) -> Path:
    """Visual attention ratio per layer: mean over samples, band = +- one standard deviation."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    for i, (_, summary) in enumerate(runs):
        rows = summary["per_layer"]
        x = np.array([r["layer"] for r in rows])
        y = np.array([r["ratio"] for r in rows])
        sd = np.array([r["ratio_std"] for r in rows])
        ax.plot(
            x,
            y,
            "o-",
            color=COLORS[i],
            label=f"{summary['label']} (deep mean {_num(summary['deep_ratio'], 3)})",
            ms=4,
        )
        ax.fill_between(x, y - sd, y + sd, color=COLORS[i], alpha=0.2, lw=0)
    _injection_bands(ax, runs)
    _layer_axis(ax, runs)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("attention mass on image tokens")
    ax.set_title(_title(runs, "Visual attention ratio"))
    _legend(ax)
    return _save(fig, path)


def plot_entropy(runs: list[Run], path: Path) -> Path:
    """Entropy of the renormalised visual attention per layer; dashed: ln Nv (uniform)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    for i, (_, summary) in enumerate(runs):
        rows = summary["per_layer"]
        x = np.array([r["layer"] for r in rows])
        y = np.array([r["entropy"] for r in rows])
        sd = np.array([r["entropy_std"] for r in rows])
        label = f"{summary['label']} (deep-layer mean {_num(summary['deep_entropy'], 2)} nats)"
        ax.plot(x, y, "o-", color=COLORS[i], label=label, ms=4)
        ax.fill_between(x, y - sd, y + sd, color=COLORS[i], alpha=0.2, lw=0)
    top = runs[0][1]["max_entropy"]
    ax.axhline(top, color="k", ls="--", lw=1, label=f"uniform: ln Nv = {top:.2f}")
    _injection_bands(ax, runs)
    _deep_band(ax, runs)
    _layer_axis(ax, runs)
    ax.set_ylim(0, top * 1.08)
    ax.set_ylabel("entropy (nats)")
    ax.set_title(_title(runs, "Entropy of the visual attention distribution"))
    _legend(ax)
    return _save(fig, path)


def plot_violin(runs: list[Run], values: list[dict[int, np.ndarray]], path: Path) -> Path:
    """Per layer, the distribution of ``Nv * p_j`` over all image tokens of all samples (log10).

    ``Nv * p_j`` is each token's share relative to uniform attention: 0 on the axis means
    "as much as a uniform spread would give", +1 ten times more. A visually attenuated layer
    is a narrow violin around 0; a focused one is wide, with a long upper tail.
    ``values``: per run, :func:`~.stats.violin_values`.
    """
    num_layers = runs[0][0].num_layers
    fig = Figure(figsize=(min(18, max(9, 0.3 * num_layers * len(runs))), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(runs)
    for i, (collection, summary) in enumerate(runs):
        data, positions = [], []
        for layer in collection.layers:
            data.append(np.log10(np.maximum(values[i][layer], FLOOR)))
            positions.append(layer + (i - (len(runs) - 1) / 2) * width)
        parts = ax.violinplot(data, positions, widths=width * 0.95, showmedians=True, showextrema=False)
        for body in parts["bodies"]:
            body.set_facecolor(COLORS[i])
            body.set_edgecolor(COLORS[i])
            body.set_alpha(0.6)
        parts["cmedians"].set_color("k")
        ax.plot([], [], color=COLORS[i], lw=8, alpha=0.6, label=summary["label"])
    ax.axhline(0, color="k", ls="--", lw=1, label="uniform")
    _injection_bands(ax, runs)
    _layer_axis(ax, runs)
    ax.set_ylabel("log10(attention share x Nv)\n(0 = uniform; -4 includes smaller)")
    ax.set_title(_title(runs, "Renormalised visual attention per image token"))
    _legend(ax)
    return _save(fig, path)


def default_heatmap_layers(runs: list[Run]) -> list[int]:
    """Quarter, half, three quarters and the last layer, plus VIF's injection layers."""
    first = runs[0][0]
    n = first.num_layers
    wanted = {n // 4, n // 2, (3 * n) // 4, n - 1}
    wanted |= {d for collection, _ in runs for d in collection.injection_layers}
    return sorted(wanted & set(first.layers))


def _split(values: np.ndarray, grids: list[tuple[int, int]]) -> list[np.ndarray]:
    """A sample's ``(Nv,)`` values -> one ``(rows, cols)`` map per image (row-major tokens)."""
    maps, start = [], 0
    for h, w in grids:
        maps.append(values[start : start + h * w].reshape(h, w))
        start += h * w
    return maps


def _overlay(
    ax: Axes,
    picture: np.ndarray | None,
    heat: np.ndarray | None,
    shape: tuple[int, int],
    vmax: float = 1.0,
) -> Any:
    """The picture, and ``heat`` (a token grid) stretched exactly over it.

    Both images share the extent ``(0, width, height, 0)`` in picture pixels, so token
    ``(i, j)`` of an ``h x w`` grid covers the pixels of patch ``(i, j)``; the heat is
    bilinearly interpolated between patch centres. Under a heatmap the picture is shown
    in dimmed grey, so the colour scale alone carries the values.
    """
    if picture is None:  # no pixels to show: a neutral canvas with the grid's aspect
        height, width = shape[0] * 16, shape[1] * 16
        picture = np.full((height, width, 3), 200, dtype=np.uint8)
    height, width = picture.shape[:2]
    extent = (0, width, height, 0)
    if heat is None:
        ax.imshow(picture, extent=extent, interpolation="nearest")
    else:
        grey = picture[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        ax.imshow(grey, cmap="gray", vmin=-128, vmax=300, extent=extent, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if heat is None:
        return None
    return ax.imshow(
        heat,
        cmap="jet",
        alpha=0.6,
        extent=extent,
        interpolation="bilinear",
        # Square-root colour scale shared by the figure: one hot token does not wash out
        # every other map, and panels stay comparable.
        norm=PowerNorm(0.5, vmin=0.0, vmax=vmax),
    )


def plot_heatmaps(runs: list[Run], out_dir: Path, layers: list[int] | None = None) -> list[dict]:
    """One figure per kept sample and image: the picture, then per layer the attention heatmap.

    Rows: each run's attention; for a run with VIF, a row with its importance map pi under
    the injection layers. Every panel shows ``Nv * p`` (1 = the uniform share) on one
    square-root colour scale per figure, 0 to the figure's peak, so a flat (attenuated) map is
    uniformly cool and a focused one shows a hot spot. Returns
    ``[{"path", "sample", "image", "meta", "runs"}]`` for the report.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    first = runs[0][0]
    layers = default_heatmap_layers(runs) if layers is None else [d for d in layers if d in first.layers]
    row_specs = []  # (title, run index, kind)
    for i, (collection, summary) in enumerate(runs):
        row_specs.append((f"{summary['label']}: attention", i, "attention"))
        if collection.injection_layers:
            row_specs.append((f"{summary['label']}: VIF importance", i, "importance"))
    n_keep = min(sum(r.images is not None for r in c.records) for c, _ in runs)
    written = []
    for s in range(n_keep):
        records = [c.records[s] for c, _ in runs]
        grids = records[0].grids
        n_vis = records[0].visual.shape[1]
        # panels[(row, col)] = (Nv * p as one map per image, title)
        panels: dict[tuple[int, int], tuple[list[np.ndarray], str]] = {}
        for r, (_, i, kind) in enumerate(row_specs):
            collection, record = runs[i][0], records[i]
            for c, layer in enumerate(layers, start=1):
                if kind == "attention":
                    pos = collection.layers.index(layer)
                    p = distribution(record, pos)
                    title = f"layer {layer}\nH={entropy(p):.2f} r={record.visual[pos].sum():.2f}"
                elif layer in record.importance:
                    p = record.importance[layer]
                    title = f"VIF pi, layer {layer}\nH={entropy(p):.2f}"
                else:
                    continue
                panels[r, c] = (_split(p * n_vis, grids), title)
        for j, (h, w) in enumerate(grids):
            picture = records[0].images[j] if records[0].images else None
            vmax = max([float(maps[j].max()) for maps, _ in panels.values()] + [1.0])
            ncols = len(layers) + 1
            fig, axes, cax = _panel_grid(len(row_specs), ncols)
            mappable = None
            for r, (row_title, _, _) in enumerate(row_specs):
                _overlay(axes[r, 0], picture, None, (h, w))
                axes[r, 0].set_title("image" if r == 0 else "", fontsize=8)
                axes[r, 0].set_ylabel(row_title, fontsize=8)
                for c in range(1, ncols):
                    if (r, c) not in panels:
                        axes[r, c].axis("off")
                        continue
                    maps, title = panels[r, c]
                    mappable = _overlay(axes[r, c], picture, maps[j], (h, w), vmax)
                    axes[r, c].set_title(title, fontsize=7)
            fig.suptitle(
                _caption(records[0].meta, j, len(grids)), fontsize=8, y=1 - 0.12 / fig.get_figheight()
            )
            if mappable is not None:
                bar = fig.colorbar(mappable, cax=cax)
                bar.solids.set_alpha(1.0)  # the scale itself opaque, not at the overlay's alpha
                ticks = [t for t in bar.get_ticks() if 0 <= t <= vmax]
                bar.set_ticks(sorted({*ticks, 1.0}))  # 1 = the uniform share
                bar.set_label("attention share x Nv  (1 = uniform)", fontsize=7)
                bar.ax.tick_params(labelsize=7)
            name = f"sample{s:03d}_image{j}.png"
            _save(fig, out_dir / name)
            runs_meta = [
                {"label": runs[i][1]["label"], "generated": records[i].meta.get("generated")}
                for i in range(len(runs))
            ]
            written.append(
                {"path": name, "sample": s, "image": j, "meta": records[0].meta, "runs": runs_meta}
            )
    return written


def _panel_grid(nrows: int, ncols: int) -> tuple[Figure, np.ndarray, Axes]:
    """A grid of square panels with room for titles, row labels and a colour bar on the right.

    Laid out by hand in inches (matplotlib's automatic layouts cost seconds per figure).
    Returns the figure, the ``(nrows, ncols)`` axes and the colour bar's axes.
    """
    panel, gap_w, gap_h = 2.0, 0.12, 0.5  # panel side and gaps (room for two-line titles)
    left, right, top, bottom = 0.3, 1.0, 0.75, 0.08
    width = left + ncols * panel + (ncols - 1) * gap_w + right
    height = top + nrows * panel + (nrows - 1) * gap_h + bottom
    fig = Figure(figsize=(width, height))
    grid = dict(
        left=left / width,
        right=1 - right / width,
        top=1 - top / height,
        bottom=bottom / height,
        wspace=gap_w / panel,
        hspace=gap_h / panel,
    )
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=grid)
    span = grid["top"] - grid["bottom"]
    cax = fig.add_axes((1 - (right - 0.15) / width, grid["bottom"] + 0.1 * span, 0.15 / width, 0.8 * span))
    return fig, axes, cax


def _caption(meta: dict, image: int, n_images: int) -> str:
    parts = [f"sample {meta.get('id', '?')}"]
    if n_images > 1:
        parts.append(f"image {image + 1}/{n_images}")
    if meta.get("question"):
        parts.append(f"Q: {_short(meta['question'])}")
    if meta.get("answer"):
        parts.append(f"A: {_short(meta['answer'])}")
    return " | ".join(parts)


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
