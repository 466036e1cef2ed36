"""Pictures of what :mod:`functional_llm.interpret` computes, as files: attention heatmaps per
head, attributions over the text (coloured tokens, as HTML and PNG) and a lens grid (each
layer's top next token at each position, shaded by its probability).

They take plain tensors and token strings, so they draw any family's results. Every file is
written atomically; matplotlib (the ``experiments`` extra) is imported when a PNG is drawn.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from functional_llm.files import atomic_path

__all__ = ["attention_heatmaps", "attribution_html", "attribution_png", "lens_grid"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - the extra is installed in development
        raise ImportError(
            "pictures need matplotlib: pip install 'functional_llm[experiments]'"
        ) from e
    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    _pyplot().close(fig)
    return path


def _check_labels(name: str, labels: Sequence[str], size: int) -> None:
    if len(labels) != size:
        raise ValueError(f"{name}: {len(labels)} labels for {size} positions")


def attention_heatmaps(
    weights: torch.Tensor,
    queries: Sequence[str],
    keys: Sequence[str] | None = None,
    path: str | Path = "attention.png",
    *,
    title: str = "",
) -> Path:
    """One heatmap per head of ``weights: (heads, T, S)`` (rows: the attending ``queries``,
    columns: the attended ``keys``, the queries by default), on one colour scale from 0 to
    the largest weight of any head."""
    if weights.ndim != 3:
        raise ValueError(
            f"attention_heatmaps: weights must be (heads, T, S), got {tuple(weights.shape)}"
        )
    keys = queries if keys is None else keys
    heads, t, s = weights.shape
    _check_labels("queries", queries, t)
    _check_labels("keys", keys, s)
    plt = _pyplot()
    cols = math.ceil(math.sqrt(heads))
    rows = math.ceil(heads / cols)
    cell = min(max(3.0, 0.2 * max(t, s)), 8.0)
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols + 1.5, cell * rows + 0.5),
                             squeeze=False, layout="constrained")  # fmt: skip
    image, top = None, max(float(weights.max()), 1e-6)
    for h, ax in enumerate(axes.flat):
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(
            weights[h].detach().float().cpu().numpy(), vmin=0, vmax=top, cmap="viridis"
        )
        ax.set_title(f"head {h}", fontsize=9)
        ax.set_xticks(range(s), list(keys), rotation=90, fontsize=7)
        ax.set_yticks(range(t), list(queries), fontsize=7)
        ax.set_xlabel("attended token", fontsize=8)
        ax.set_ylabel("query token", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _colour(score: float, scale: float) -> tuple[float, float, float]:
    """White at 0, red for positive and blue for negative scores, by ``|score| / scale``."""
    a = 0.0 if scale == 0 else min(abs(score) / scale, 1.0)
    return (1.0, 1 - a, 1 - a) if score >= 0 else (1 - a, 1 - a, 1.0)


def attribution_html(
    tokens: Sequence[str], scores: torch.Tensor, path: str | Path = "attribution.html", *,
    title: str = "",
) -> Path:  # fmt: skip
    """The text with each token's background red (it raised the target) or blue (it lowered
    it), in proportion to its score over the largest ``|score|``; hover shows the value."""
    values = [float(v) for v in scores.detach().flatten()]
    _check_labels("tokens", tokens, len(values))
    scale = max((abs(v) for v in values), default=0.0)
    spans = []
    for token, v in zip(tokens, values, strict=True):
        r, g, b = (round(255 * c) for c in _colour(v, scale))
        spans.append(f'<span title="{v:+.4f}" style="background: rgb({r},{g},{b}); '
                     f'padding: 1px 2px; margin: 1px; border-radius: 3px">'
                     f"{html.escape(token)}</span>")  # fmt: skip
    body = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title or 'attribution')}"
        f"</title><body style='font-family: monospace; line-height: 2'>"
        f"<h3>{html.escape(title)}</h3><p>{''.join(spans)}</p>"
        f"<p style='color: #666'>red: raised the target, blue: lowered it; largest |score| "
        f"{scale:.4g}</p></body>"
    )
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return path


def attribution_png(
    tokens: Sequence[str], scores: torch.Tensor, path: str | Path = "attribution.png", *,
    title: str = "", per_line: int = 12,
) -> Path:  # fmt: skip
    """:func:`attribution_html` as a picture: tokens in boxes coloured by score, wrapped."""
    values = [float(v) for v in scores.detach().flatten()]
    _check_labels("tokens", tokens, len(values))
    scale = max((abs(v) for v in values), default=0.0)
    plt = _pyplot()
    lines = max(1, math.ceil(len(values) / per_line))
    fig, ax = plt.subplots(figsize=(per_line * 0.9, 0.6 * lines + 0.8))
    ax.set_xlim(0, per_line)
    ax.set_ylim(lines, 0)
    ax.axis("off")
    for i, (token, v) in enumerate(zip(tokens, values, strict=True)):
        ax.text(i % per_line + 0.5, i // per_line + 0.5, token.replace("\n", "\\n"),
                ha="center", va="center", fontsize=9, family="monospace",
                bbox={"facecolor": _colour(v, scale), "edgecolor": "#999", "pad": 3})  # fmt: skip
    ax.set_title(f"{title}\nred raised the target, blue lowered it (max |score| {scale:.3g})",
                 fontsize=9)  # fmt: skip
    return _save(fig, path)


def lens_grid(
    top_tokens: Sequence[Sequence[str]],
    probs: torch.Tensor,
    positions: Sequence[str],
    path: str | Path = "lens.png",
    *,
    title: str = "",
) -> Path:
    """A lens as a grid: row ``l`` is layer ``l``'s state (0: the embeddings), column ``t`` the
    input token at ``t``; each cell names that layer's top next token, shaded by its
    probability ``probs: (layers, T)``."""
    layers, t = probs.shape
    if len(top_tokens) != layers or any(len(row) != t for row in top_tokens):
        raise ValueError(f"lens_grid: top_tokens must be {layers} rows of {t}, like probs")
    _check_labels("positions", positions, t)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(0.55 * t + 2.5, 0.45 * layers + 1.5), layout="constrained")
    image = ax.imshow(
        probs.detach().float().cpu().numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto"
    )
    for layer in range(layers):
        for pos in range(t):
            p = float(probs[layer, pos])
            ax.text(pos, layer, top_tokens[layer][pos].replace("\n", "\\n"), ha="center",
                    va="center", fontsize=7, color="white" if p > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(t), list(positions), rotation=90, fontsize=8)
    ax.set_yticks(range(layers), ["embed", *(f"block {i}" for i in range(layers - 1))], fontsize=8)
    ax.set_xlabel("input token")
    ax.set_ylabel("residual stream after")
    fig.colorbar(image, ax=ax, label="probability of the top token")
    if title:
        ax.set_title(title)
    return _save(fig, path)
