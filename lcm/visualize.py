"""The paper's two pictures of what LCM learns (its Figs. 3 and 4), for any LCM checkpoint.

- :func:`attention_figure` (``lcm visualize attention``): per label, the spatial maps behind
  its tokens. *class-aware* is the class's spatial softmax A_c, the paper's "vanilla ResNet
  (i.e., class-aware features)"; *context* is the map the class reaches through the latent
  context tokens, sum_k w_ck S_k (its attention over the K context tokens times each token's
  spatial assignment), titled with its overlap with the class-aware map (the sum over
  positions of the smaller of the two; 1 = the same place); *LCM* is their mean, the spatial
  support of the class's two fusion tokens, weighted equally [ours: the paper does not say
  how its maps are drawn]. With
  ``baseline`` (a ``gap`` checkpoint) a column shows that plain ResNet's class activation map.
- :func:`tsne_figure` (``lcm visualize tsne``): t-SNE of the class-aware, context-aware and
  fusion features (F_cls, F_ctx and the Transformer's output Z) of every positive label of
  the val images, coloured by label. Each panel also gives two numbers measured in the
  features themselves (cosine, before t-SNE), to read beside the picture, since t-SNE alone
  can make clusters look tighter or looser than they are: the labels' silhouette (one compact
  cluster per label scores high) and the leave-one-out 5-nearest-neighbour label accuracy
  (high when neighbours share a label, even if a label is split into several clusters).

Maps are at the backbone's resolution (image size / 32: 4 x 4 at 128 px), upsampled
bilinearly for display.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lcm.errors import ConfigError, DataError


def _load(model_dir: Path, weights: str, device: torch.device, want: str) -> Any:
    from lcm.checkpoint import load_for_inference

    loaded = load_for_inference(Path(model_dir), weights, device)
    if loaded.meta.model.arch != want:
        raise ConfigError(
            f"{model_dir}: a {loaded.meta.model.arch!r} model; this needs an {want!r} checkpoint"
        )
    return loaded


def _pixels(image: Path, size: int) -> torch.Tensor:
    """uint8 (3, S, S) of an image file, resized as prediction resizes it."""
    from lcm.data.transforms import decode_image_file, eval_transform

    if not Path(image).is_file():
        raise DataError(f"{image}: no such image file")
    try:
        img = decode_image_file(Path(image).read_bytes())
    except RuntimeError as e:
        raise DataError(f"{image}: not a decodable JPEG or PNG ({e})") from e
    return eval_transform(size).pixels(img)


def save_png(fig: Any, out: Path) -> None:
    """Write ``fig`` as a PNG under a temporary name and rename it (never half a file);
    closes the figure."""
    import matplotlib.pyplot as plt

    from lcm.io import atomic_path

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _upsample(maps: torch.Tensor, size: int) -> np.ndarray:
    """(L, h, w) -> (L, S, S), each map min-max scaled to [0, 1]."""
    up = F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear")[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    return ((up - lo) / (hi - lo).clamp(min=1e-12)).cpu().numpy()


@torch.no_grad()
def attention_figure(
    model_dir: Path,
    image: Path,
    out: Path,
    *,
    labels: Sequence[str] | None = None,
    top: int = 4,
    weights: str = "raw",
    baseline: Path | None = None,
    device: torch.device | None = None,
) -> list[tuple[str, float, float]]:
    """Write the attention figure of one image; returns the rows shown: (label, score,
    overlap of its context map with its class-aware map, 0-1).

    Rows are ``labels`` or else the labels at or above their threshold, highest score first
    (at most ``top``; the top-scoring label when none is).
    """
    from lcm.data.transforms import normalize

    device = device or torch.device("cpu")
    loaded = _load(model_dir, weights, device, "lcm")
    meta = loaded.meta
    classes = list(meta.classes)
    px = _pixels(image, meta.image_size)
    x = normalize(px[None].to(device), mean=meta.mean, std=meta.std)
    feats = loaded.model.forward_features(x)
    scores = torch.sigmoid(feats["logits"][0].float()).cpu().numpy()
    if labels:
        unknown = [name for name in labels if name not in classes]
        if unknown:
            raise ConfigError(f"unknown label {unknown[0]!r}; the model's labels: "
                              f"{', '.join(classes)}")  # fmt: skip
        chosen = [classes.index(name) for name in labels]
    else:
        if top < 1:
            raise ConfigError(f"--top must be at least 1, got {top}")
        order = np.argsort(-scores)
        chosen = [int(c) for c in order if scores[c] >= loaded.thresholds[c]][:top]
        chosen = chosen or [int(order[0])]
    columns = {
        "class-aware": feats["class_attention"][0, chosen],
        "context": feats["context_map"][0, chosen],
    }
    columns["LCM (class-aware + context)"] = (columns["class-aware"] + columns["context"]) / 2
    # Both maps are distributions over positions: their overlap (sum of the minimum) is 1 when
    # the context tokens look where the class-aware map looks, 0 when elsewhere entirely.
    overlap = torch.minimum(columns["class-aware"], columns["context"]).sum(dim=(1, 2)).tolist()
    if baseline is not None:
        base = _load(baseline, weights, device, "gap")
        if list(base.meta.classes) != classes:
            raise ConfigError(f"{baseline}: its labels differ from {model_dir}'s")
        xb = normalize(px[None].to(device), mean=base.meta.mean, std=base.meta.std)
        columns = {"plain ResNet (CAM)": base.model.forward_features(xb)["cam"][0, chosen]
                   .relu(), **columns}  # fmt: skip
    size = meta.image_size
    shown = px.permute(1, 2, 0).numpy()
    plt = _pyplot()
    fig, axes = plt.subplots(len(chosen), 1 + len(columns), squeeze=False,
                             figsize=(2.3 * (1 + len(columns)), 2.4 * len(chosen)))  # fmt: skip
    ups = {name: _upsample(maps, size) for name, maps in columns.items()}
    for row, c in enumerate(chosen):
        axes[row, 0].imshow(shown)
        axes[row, 0].set_title(f"{classes[c]}: {scores[c]:.2f}", fontsize=9)
        for col, (name, maps) in enumerate(ups.items(), 1):
            axes[row, col].imshow(shown)
            axes[row, col].imshow(maps[row], cmap="jet", alpha=0.45, vmin=0, vmax=1)
            title = name if row == 0 else ""
            if name == "context":
                title = f"{title}\n" if title else ""
                title += f"overlap with class-aware {overlap[row]:.2f}"
            axes[row, col].set_title(title, fontsize=9)
    for ax in axes.flat:
        ax.set_axis_off()
    h, w = feats["class_attention"].shape[-2:]
    fig.suptitle(f"{Path(image).name} ({size} px; maps {h} x {w}, upsampled)", fontsize=9)
    fig.tight_layout()
    save_png(fig, out)
    return [(classes[c], float(scores[c]), overlap[i]) for i, c in enumerate(chosen)]


@torch.no_grad()
def tsne_figure(
    model_dir: Path,
    shards: str,
    out: Path,
    *,
    max_images: int = 300,
    weights: str = "raw",
    seed: int = 0,
    device: torch.device | None = None,
    progress: Any = None,
) -> dict[str, dict[str, float]]:
    """Write the t-SNE figure; returns each feature kind's label silhouette and 5-NN label
    accuracy (``{"silhouette": {kind: value}, "knn": {kind: value}}``)."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    from lcm.data.shards import eval_loader

    if max_images < 2:
        raise ConfigError(f"--max-images must be at least 2, got {max_images}")
    device = device or torch.device("cpu")
    loaded = _load(model_dir, weights, device, "lcm")
    meta = loaded.meta
    loader = eval_loader(shards, batch_size=64, image_size=meta.image_size, num_workers=0,
                         mean=meta.mean, std=meta.std)  # fmt: skip
    kinds = {"class-aware (F_cls)": "f_cls", "context-aware (F_ctx)": "f_ctx",
             "fusion (Z)": "z"}  # fmt: skip
    feats: dict[str, list[np.ndarray]] = {k: [] for k in kinds.values()}
    names: list[int] = []
    seen = 0
    for batch in loader:
        take = min(len(batch.keys), max_images - seen)
        f = loaded.model.forward_features(batch.images[:take].to(device))
        b_idx, c_idx = torch.nonzero(batch.targets[:take] == 1, as_tuple=True)
        for key in feats:
            feats[key].append(f[key][b_idx, c_idx].float().cpu().numpy())
        names.extend(c_idx.tolist())
        seen += take
        if progress:
            progress(seen, max_images)
        if seen >= max_images:
            break
    labels = np.asarray(names)
    if len(np.unique(labels)) < 2:
        raise DataError(f"{shards}: fewer than two labels among the first {seen} images' "
                        "positives; nothing to separate")  # fmt: skip
    classes = list(meta.classes)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    silhouettes, knn = {}, {}
    palette = [plt.get_cmap(m)(i) for m in ("tab20", "tab20b", "tab20c") for i in range(20)]
    for ax, (title, key) in zip(axes, kinds.items(), strict=True):
        x = np.concatenate(feats[key])
        silhouettes[title] = float(silhouette_score(x, labels, metric="cosine"))
        knn[title] = knn_accuracy(x, labels)
        perplexity = float(min(30.0, (len(x) - 1) / 3))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        for c in np.unique(labels):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=6, color=palette[int(c) % len(palette)],
                       label=classes[c])  # fmt: skip
        ax.set_title(f"{title}\nbefore t-SNE: label silhouette {silhouettes[title]:+.2f}, "
                     f"5-NN label accuracy {knn[title]:.2f}", fontsize=10)  # fmt: skip
        ax.set_xticks([])
        ax.set_yticks([])
    handles, texts = axes[0].get_legend_handles_labels()
    ncol = min(len(texts), 10)
    fig.legend(handles, texts, loc="lower center", ncol=ncol, fontsize=8,
               markerscale=2.5)  # fmt: skip
    legend_rows = -(-len(texts) // ncol)
    fig.suptitle(f"{len(labels)} positive labels of {seen} val images, {meta.image_size} px",
                 fontsize=10)  # fmt: skip
    fig.tight_layout(rect=(0, 0.045 * legend_rows + 0.02, 1, 1))
    save_png(fig, out)
    return {"silhouette": silhouettes, "knn": knn}


def knn_accuracy(x: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out accuracy of a ``k``-nearest-neighbour vote (cosine similarity); ties go
    to the label of the nearer neighbour."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(x) - 1)
    near = np.argsort(-sim, axis=1)[:, :k]  # nearest first
    correct = 0
    for i, row in enumerate(near):
        votes: dict[int, int] = {}
        for j in row:
            votes[int(labels[j])] = votes.get(int(labels[j]), 0) + 1
        top = max(votes.values())
        winner = next(int(labels[j]) for j in row if votes[int(labels[j])] == top)
        correct += winner == labels[i]
    return correct / len(x)
