"""Rendering: placed glyphs -> an RGB image (the renderer sees glyphs, never classes)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lcm.data.synthetic.story import (
    _SUPERSAMPLE,
    TINT_JITTER,
    Placed,
    Scene,
)

# ---- rendering (glyphs only) ----------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a shape on rotated coordinates in the unit disc."""
    au, av = np.abs(u), np.abs(v)
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 0.9
    if shape == "ring":
        return (r <= 0.95) & (r >= 0.55)
    if shape == "square":
        return np.maximum(au, av) <= 0.66
    if shape == "frame":
        m = np.maximum(au, av)
        return (m <= 0.68) & (m >= 0.4)
    if shape == "diamond":
        return au + av <= 0.92
    if shape == "triangle":
        return (v <= 0.47) & (np.sqrt(3) * au - v <= 0.94)
    if shape == "hexagon":
        return (av <= 0.8) & (np.sqrt(3) * au + av <= 1.6)
    if shape == "star":
        return r <= 0.55 + 0.38 * np.cos(5 * np.arctan2(v, u))
    if shape == "crescent":
        return (r <= 0.9) & (np.hypot(u - 0.4, v) > 0.7)
    if shape == "semicircle":
        return (r <= 0.92) & (v <= 0.2)
    if shape == "ellipse":
        return (u / 0.9) ** 2 + (v / 0.5) ** 2 <= 1
    if shape == "pill":
        return np.hypot(np.maximum(au - 0.5, 0), v) <= 0.4
    if shape == "bar":
        return (au <= 0.92) & (av <= 0.3)
    if shape == "plus":
        return ((au <= 0.28) & (av <= 0.9)) | ((av <= 0.28) & (au <= 0.9))
    if shape == "cross":
        return _shape_mask("plus", (u + v) / np.sqrt(2), (u - v) / np.sqrt(2))
    if shape == "chevron":
        d = v - 0.8 * au
        return (au <= 0.8) & (d >= -0.5) & (d <= -0.05)
    raise ValueError(f"unknown shape {shape!r}")


@dataclass(frozen=True)
class Box:
    bbox: list[float]  # COCO [x, y, w, h] of the drawn pixels
    area: float  # covered pixels (anti-aliased)


def _coverage(obj: Placed, size: int) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of one glyph: top-left corner and alpha (h, w)."""
    half = obj.side / 2
    x0, y0 = max(int(np.floor(obj.cx - half)), 0), max(int(np.floor(obj.cy - half)), 0)
    x1, y1 = min(int(np.ceil(obj.cx + half)), size), min(int(np.ceil(obj.cy + half)), size)
    offs = (np.arange(_SUPERSAMPLE) + 0.5) / _SUPERSAMPLE
    du = ((np.arange(x0, x1)[:, None] + offs).ravel() - obj.cx) / half  # (w*SS,)
    dv = ((np.arange(y0, y1)[:, None] + offs).ravel() - obj.cy) / half  # (h*SS,)
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    u = c * du[None, :] + s * dv[:, None]  # (h*SS, w*SS)
    v = -s * du[None, :] + c * dv[:, None]
    mask = _shape_mask(obj.shape, u, v)
    alpha = mask.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean(axis=(1, 3))
    return x0, y0, alpha


def _interp(size: int, n: int) -> np.ndarray:
    """(size, n) bilinear weights that stretch an n-point grid over size pixels."""
    t = (np.arange(size) + 0.5) / size * (n - 1)
    return np.clip(1 - np.abs(t[:, None] - np.arange(n)[None, :]), 0, None)


def _background(tint: tuple[float, ...], size: int, rng: np.random.Generator) -> np.ndarray:
    base = np.asarray(tint, dtype=np.float64) + rng.normal(0.0, TINT_JITTER, 3)
    w = _interp(size, 4)
    rows = np.tensordot(w, rng.normal(0.0, 12.0, (4, 4, 3)), axes=(1, 0))  # (S, 4, 3)
    blotches = (rows.transpose(0, 2, 1) @ w.T).transpose(0, 2, 1)  # (S, S, 3)
    theta, amp = rng.uniform(0, 2 * np.pi), rng.normal(0.0, 12.0)
    pos = (np.arange(size) + 0.5) / size - 0.5
    ramp = amp * (np.cos(theta) * pos[None, :] + np.sin(theta) * pos[:, None])  # (S, S)
    return (base + blotches + ramp[..., None]).astype(np.float32)


def render_image(
    scene: Scene, objects: list[Placed], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[Box]]:
    """Pixels (S, S, 3) uint8 and one box per object; later objects occlude earlier ones."""
    img = _background(scene.tint, size, rng)  # (S, S, 3)
    boxes: list[Box] = []
    for obj in objects:
        x0, y0, alpha = _coverage(obj, size)
        h, w = alpha.shape
        patch = img[y0 : y0 + h, x0 : x0 + w]
        patch += alpha[..., None] * (np.asarray(obj.rgb) - patch)
        rows, cols = np.nonzero(alpha.any(axis=1))[0], np.nonzero(alpha.any(axis=0))[0]
        bbox = [float(x0 + cols[0]), float(y0 + rows[0]), float(cols[-1] - cols[0] + 1),
                float(rows[-1] - rows[0] + 1)]  # fmt: skip
        boxes.append(Box(bbox, round(float(alpha.sum()), 2)))
    img += 5.0 * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), boxes
