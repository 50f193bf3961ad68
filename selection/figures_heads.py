"""Head-score heatmap: retrieval score per (layer, head), selected heads boxed.

Layers run top to bottom (layer 0 first) and heads left to right, the layout of most retrieval-head
papers; the selected heads get a box so the figure shows at a glance whether retrieval heads
cluster in middle layers (as Wu et al. report) or scatter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from attninf import plots


def plot_head_scores(scores: Sequence[Sequence[float]], selected: Sequence[Sequence[int]],
                     path: str | Path, title: str = "retrieval scores") -> Path:
    plt = plots.pyplot()
    from matplotlib.patches import Rectangle
    import numpy as np

    arr = np.asarray(scores, dtype=float)
    n_layers, n_heads = arr.shape
    w = min(3 + 0.45 * n_heads, 16)
    h = min(2 + 0.28 * n_layers, 14)
    fig, ax = plt.subplots(figsize=(w, h))
    im = ax.imshow(arr, aspect="auto", cmap="viridis", origin="upper", vmin=0.0,
                   vmax=max(float(arr.max()), 1e-9), interpolation="nearest")
    for l, hd in selected:
        ax.add_patch(Rectangle((hd - 0.5, l - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.8))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 16)))
    ax.set_title(f"{title}\n{len(selected)} selected heads boxed")
    fig.colorbar(im, ax=ax, label="retrieval score (token recall)")
    return plots.save(fig, path)


def main(argv: list[str] | None = None) -> None:
    """Redraw the heatmap of a finished detection: python -m selection.figures_heads heads.json [out.png]"""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("heads_json", type=Path)
    p.add_argument("out", type=Path, nargs="?")
    args = p.parse_args(argv)
    doc = json.loads(args.heads_json.read_text())
    out = args.out or args.heads_json.with_name("heatmap.png")
    title = f"{doc.get('model', '')}: retrieval scores ({doc.get('mode')}, {doc.get('num_probes')} probes)"
    print(plot_head_scores(doc["scores"], doc["selected"], out, title=title))


if __name__ == "__main__":
    main()
