"""A study's reading: a trend fitted across its levels, a figure and a markdown table.

The issue with a grid of a few seeds is noise, and a pairwise test per level multiplies it.
So each study is read as one fit across all its runs (every seed an observation): a
polynomial in the swept value, quadratic when there are three levels or more. From it:

- the **trend**: the slope of a straight-line fit, mAP points per unit, with its 95%
  t-interval;
- the **fitted best** level of the grid, and the gap from it down to the **paper's best
  value** with a 95% t-interval from the quadratic fit's covariance (its residuals are the seed
  noise). The verdict is "best", "within the noise" (the interval covers 0) or "below".

``partial`` sweeps beta at each missing ratio: one such fit per ratio, plus the paper's trend
claim as a regression ``mAP ~ missing + beta + missing x beta``, whose interaction term is
positive when a larger beta helps more as labels go missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lcm.io import atomic_write_text
from lcm.studies.grids import PAPER_PARTIAL, PAPER_PARTIAL_BEST, Profile, Study


@dataclass(frozen=True)
class Estimate:
    value: float
    lo: float
    hi: float

    def text(self, digits: int = 1) -> str:
        if math.isnan(self.lo):
            return f"{self.value:+.{digits}f} (no noise estimate)"
        return f"{self.value:+.{digits}f} [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}]"

    @property
    def covers_zero(self) -> bool:
        return math.isnan(self.lo) or self.lo <= 0 <= self.hi


@dataclass(frozen=True)
class Fit:
    """Least squares of y on a polynomial basis of x, with the noise estimate it needs."""

    degree: int
    coef: np.ndarray
    cov: np.ndarray | None  # None when there are no residual degrees of freedom
    df: int

    def __call__(self, x: Any) -> np.ndarray:
        return _basis(np.asarray(x, dtype=float), self.degree) @ self.coef

    def diff(self, a: float, b: float) -> Estimate:
        """fit(a) - fit(b) with its 95% t-interval."""
        g = (_basis(np.array([a]), self.degree) - _basis(np.array([b]), self.degree))[0]
        return _contrast(g, self.coef, self.cov, self.df)


def _basis(x: np.ndarray, degree: int) -> np.ndarray:
    return np.stack([x**k for k in range(degree + 1)], axis=1)


def _t975(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


def _ols(a: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Least squares of ``y`` on the columns of ``a``: coefficients, their covariance (None
    without residual degrees of freedom) and those degrees of freedom."""
    coef, *_ = np.linalg.lstsq(a, y, rcond=None)
    df = len(y) - a.shape[1]
    if df <= 0:
        return coef, None, df
    resid = y - a @ coef
    return coef, float(resid @ resid) / df * np.linalg.pinv(a.T @ a), df


def _contrast(g: np.ndarray, coef: np.ndarray, cov: np.ndarray | None, df: int) -> Estimate:
    """``g . coef`` with its 95% t-interval (NaN bounds without a noise estimate)."""
    est = float(g @ coef)
    if cov is None:
        return Estimate(est, math.nan, math.nan)
    half = _t975(df) * math.sqrt(max(float(g @ cov @ g), 0.0))
    return Estimate(est, est - half, est + half)


def fit_poly(x: np.ndarray, y: np.ndarray, degree: int) -> Fit:
    """OLS of ``y`` on ``1, x, ..., x^degree``; ``degree`` is capped by the levels present."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    degree = max(0, min(degree, len(np.unique(x)) - 1))
    return Fit(degree, *_ols(_basis(x, degree), y))


def slope(x: np.ndarray, y: np.ndarray) -> Estimate:
    """The straight-line trend, mAP points per unit of x, with its 95% interval."""
    f = fit_poly(x, y, 1)
    if f.degree < 1:
        return Estimate(math.nan, math.nan, math.nan)
    return _contrast(np.array([0.0, 1.0]), f.coef, f.cov, f.df)


@dataclass(frozen=True)
class Reading:
    """A sweep's fit and what it says about the paper's best value."""

    levels: list[float]
    fit: Fit
    trend: Estimate
    best: float  # the fitted best level of the grid
    paper_best: float | None
    gap: Estimate | None  # fit(best) - fit(paper_best)
    verdict: str


def read_sweep(x: np.ndarray, y: np.ndarray, paper_best: float | None, what: str) -> Reading:
    levels = sorted({float(v) for v in x})
    fit = fit_poly(x, y, 2)
    fitted = fit(levels)
    best = levels[int(np.argmax(fitted))]
    gap = None
    if paper_best is None:
        verdict = "the paper gives no best value here"
    elif not any(math.isclose(paper_best, v) for v in levels):
        verdict = f"the paper's best {what} {paper_best:g} is not on this grid"
    elif math.isclose(best, paper_best):
        others = [v for v in levels if not math.isclose(v, best)]
        runner = others[int(np.argmax(fit(others)))] if others else None
        if runner is None:
            verdict = f"the paper's best {what} {paper_best:g} is the only level"
        else:
            gap = fit.diff(best, runner)
            tie = " but within the seed noise of " if gap.covers_zero else ", ahead of "
            verdict = (f"**agrees**: {what} {paper_best:g} is best on our data{tie}"
                       f"{runner:g} (gap {gap.text()})")  # fmt: skip
    else:
        gap = fit.diff(best, paper_best)
        if gap.covers_zero:
            verdict = (f"**within the noise**: our fitted best is {what} {best:g}; the paper's "
                       f"{paper_best:g} is {gap.text()} points behind it, an interval that "
                       "covers 0")  # fmt: skip
        else:
            verdict = (f"**disagrees**: our fitted best is {what} {best:g}; the paper's "
                       f"{paper_best:g} is {gap.text()} points behind it")  # fmt: skip
    return Reading(levels, fit, slope(x, y), best, paper_best, gap, verdict)


def _span(est: Estimate, lo: float, hi: float) -> str:
    """A per-unit slope as the change across ``lo``..``hi``."""
    w = hi - lo
    return Estimate(est.value * w, est.lo * w, est.hi * w).text(1)


def interaction(m: np.ndarray, beta: np.ndarray, y: np.ndarray) -> Estimate:
    """The ``missing x beta`` coefficient of ``mAP ~ 1 + missing + beta + missing x beta``,
    in mAP points per (unit missing x unit beta), with its 95% interval."""
    coef, cov, df = _ols(np.stack([np.ones_like(m), m, beta, m * beta], axis=1), y)
    if len(np.unique(m)) < 2 or len(np.unique(beta)) < 2:
        cov = None  # the term is not identified: no interval
    return _contrast(np.array([0.0, 0.0, 0.0, 1.0]), coef, cov, df)


# ----------------------------------------------------------------------------- table, figure
def _mean_sd(values: list[float]) -> str:
    arr = np.asarray(values, dtype=float)
    if len(arr) < 2:
        return f"{arr.mean():.1f}"  # one seed: no spread to show
    return f"{arr.mean():.1f} ± {arr.std(ddof=1):.1f}"


def _devices(rows: list[dict]) -> str:
    return ", ".join(sorted({r["device"] for r in rows}))


def write_report(study: Study, profile: Profile, rows: list[dict], out_dir: Path,
                 extra: list[str] | None = None) -> str:  # fmt: skip
    """``<out_dir>/<profile>.md`` and ``<profile>.png`` for one study; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = sorted({r["seed"] for r in rows})
    head = [
        f"## Study `{study.name}` ({profile.name} profile)", "",
        f"{profile.tier} tier, {profile.n_train} train / {profile.n_val} val images at "
        f"{profile.size} px, {profile.epochs} epoch{'s' if profile.epochs != 1 else ''}, "
        f"batch {profile.batch}, seeds "
        f"{', '.join(map(str, seeds))}; mAP of the final raw weights on the val split. "
        f"Runs on: {_devices(rows) or '-'}.", "",
        f"**Paper** (COCO): {study.finding}.", "",
    ]  # fmt: skip
    caption = f"{profile.name} profile, {len(seeds)} seeds, {_devices(rows)}"
    if study.name == "partial":
        body = _partial_section(study, rows, out_dir / f"{profile.name}.png", caption)
    else:
        body = _sweep_section(study, rows, out_dir / f"{profile.name}.png", caption)
    text = "\n".join(head + body + (extra or [])) + "\n"
    atomic_write_text(out_dir / f"{profile.name}.md", text)
    return text


def _sweep_section(study: Study, rows: list[dict], figure: Path, caption: str) -> list[str]:
    lines = [f"| {study.key.split('.')[1]} | seeds | mAP | aux-head mAP | paper |",
             "|---|---|---|---|---|"]  # fmt: skip
    levels = sorted({r["value"] for r in rows})
    for v in levels:
        sel = [r for r in rows if r["value"] == v]
        aux = [100 * r["aux_mAP"] for r in sel if r.get("aux_mAP") is not None]
        paper = "best" if study.paper_best is not None and math.isclose(v, study.paper_best) else ""
        lines.append(f"| {v:g} | {len(sel)} | {_mean_sd([100 * r['mAP'] for r in sel])} | "
                     f"{_mean_sd(aux) if aux else '-'} | {paper} |")  # fmt: skip
    if len(levels) < 2:
        _plot_sweep(study, rows, None, figure, caption)
        return [*lines, "", "One level only: no trend to fit."]
    x = np.array([r["value"] for r in rows])
    y = np.array([100 * r["mAP"] for r in rows])
    reading = read_sweep(x, y, study.paper_best, study.key.split(".")[1].replace("_", " "))
    _plot_sweep(study, rows, reading, figure, caption)
    lo, hi = min(levels), max(levels)
    return [*lines, "",
            f"**Trend** (a straight line through every run): {_span(reading.trend, lo, hi)} "
            f"mAP points from {lo:g} to {hi:g}; fitted best level (quadratic): "
            f"{reading.best:g}.", "",
            f"**Paper's best on our data**: {reading.verdict}."]  # fmt: skip


def _partial_section(study: Study, rows: list[dict], figure: Path, caption: str) -> list[str]:
    lines = ["| missing | beta | seeds | mAP | paper (COCO) |", "|---|---|---|---|---|"]
    ratios = sorted({r["missing"] for r in rows})
    readings: dict[float, Reading] = {}
    for m in ratios:
        at = [r for r in rows if r["missing"] == m]
        for b in sorted({r["value"] for r in at}):
            sel = [r for r in at if r["value"] == b]
            paper = PAPER_PARTIAL.get((round(m, 2), round(b, 2)))
            lines.append(f"| {m:.0%} | {b:g} | {len(sel)} | "
                         f"{_mean_sd([100 * r['mAP'] for r in sel])} | "
                         f"{'' if paper is None else f'{paper:.1f}'} |")  # fmt: skip
        if len({r["value"] for r in at}) >= 2:
            readings[m] = read_sweep(np.array([r["value"] for r in at]),
                                     np.array([100 * r["mAP"] for r in at]),
                                     PAPER_PARTIAL_BEST.get(round(m, 2)), "beta")  # fmt: skip
    lines.append("")
    for m, reading in readings.items():
        lo, hi = min(reading.levels), max(reading.levels)
        lines.append(f"- **{m:.0%} missing**: beta {lo:g} to {hi:g} moves mAP by "
                     f"{_span(reading.trend, lo, hi)} points (straight line); "
                     f"{reading.verdict}.")  # fmt: skip
    if len(ratios) >= 2 and len({r["value"] for r in rows}) >= 2:
        est = interaction(np.array([r["missing"] for r in rows]),
                          np.array([r["value"] for r in rows]),
                          np.array([100 * r["mAP"] for r in rows]))  # fmt: skip
        m_lo, m_hi = ratios[0], ratios[-1]
        b_lo, b_hi = min(r["value"] for r in rows), max(r["value"] for r in rows)
        scale = (m_hi - m_lo) * (b_hi - b_lo)
        est = Estimate(est.value * scale, est.lo * scale, est.hi * scale)
        holds = ("**agrees**" if not est.covers_zero and est.value > 0
                 else "**not shown**" if est.covers_zero else "**disagrees**")  # fmt: skip
        lines += ["", f"**Paper's trend** (more missing labels want a larger beta) on our "
                  f"data: {holds}. From the regression mAP ~ missing + beta + missing x beta: "
                  f"raising beta from {b_lo:g} to {b_hi:g} gains {est.text(1)} points more at "
                  f"{m_hi:.0%} missing than at {m_lo:.0%} (positive: the paper's trend)."
                  ]  # fmt: skip
    _plot_partial(rows, readings, figure, caption)
    return lines


def _axes(title: str, xlabel: str) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4))
    ax.set_title(title, fontsize=10)
    ax.set(xlabel=xlabel, ylabel="val mAP (%)")
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_sweep(study: Study, rows: list[dict], reading: Reading | None, path: Path,
                caption: str) -> None:  # fmt: skip
    from lcm.visualize import save_png

    fig, ax = _axes(f"{study.name}: mAP against {study.key}\n{caption}", study.label)
    levels = sorted({r["value"] for r in rows})
    stats = [np.asarray([100 * r["mAP"] for r in rows if r["value"] == v]) for v in levels]
    ax.scatter([r["value"] for r in rows], [100 * r["mAP"] for r in rows], s=12, alpha=0.4,
               color="tab:blue", label="one seed")  # fmt: skip
    ax.errorbar(levels, [s.mean() for s in stats],
                yerr=[s.std(ddof=1) if len(s) > 1 else 0 for s in stats], fmt="o-",
                color="tab:blue", capsize=4, label="mean ± sd over seeds")  # fmt: skip
    if reading is not None and reading.fit.degree >= 1:
        dense = np.linspace(min(levels), max(levels), 100)
        ax.plot(dense, reading.fit(dense), "--", color="tab:gray", label="fitted trend")
    if study.paper_best is not None:
        ax.axvline(study.paper_best, color="tab:red", ls=":", label="paper's best")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def _plot_partial(rows: list[dict], readings: dict[float, Reading], path: Path,
                  caption: str) -> None:  # fmt: skip
    from lcm.visualize import save_png

    fig, ax = _axes(f"partial labels: mAP against beta per missing ratio\n{caption}", "beta")
    for i, m in enumerate(sorted({r["missing"] for r in rows})):
        color = f"C{i}"
        at = [r for r in rows if r["missing"] == m]
        levels = sorted({r["value"] for r in at})
        stats = [np.asarray([100 * r["mAP"] for r in at if r["value"] == b]) for b in levels]
        ax.errorbar(levels, [s.mean() for s in stats],
                    yerr=[s.std(ddof=1) if len(s) > 1 else 0 for s in stats], fmt="o-",
                    color=color, capsize=4, label=f"{m:.0%} missing")  # fmt: skip
        best = PAPER_PARTIAL_BEST.get(round(m, 2))
        if best is not None:
            ax.axvline(best, color=color, ls=":", alpha=0.7)
    ax.legend(fontsize=8, title="dotted: paper's best beta", title_fontsize=8)
    fig.tight_layout()
    save_png(fig, path)


def inference_cost(profile: Profile, num_classes: int = 20) -> list[str]:
    """The paper's claim that the partial-label branch costs nothing at inference, counted:
    parameters and MACs of one eval-mode forward with the branch trained and without."""
    import torch

    from lcm.config import ModelConfig
    from lcm.models.complexity import count_macs, count_params
    from lcm.models.registry import build_model
    from lcm.studies.grids import BASE_MODEL

    cfg = ModelConfig(**{**BASE_MODEL, **profile.model})
    counts = {}
    for branch in (True, False):
        with torch.device("meta"):
            model = build_model(cfg, num_classes, branch=branch).eval()
        counts[branch] = (count_params(model), count_macs(model, profile.size)[0])
    (p1, m1), (p0, m0) = counts[True], counts[False]
    same = "the same" if (p1, m1) == (p0, m0) else "different"
    return ["", f"**Inference cost of the branch** (counted, {profile.size} px, {num_classes} "
            f"classes): trained with it, {p1 / 1e6:.2f} M parameters and {m1 / 1e9:.3f} GMACs "
            f"per image; without it, {p0 / 1e6:.2f} M and {m0 / 1e9:.3f} GMACs: {same}. The "
            "branch's label-state embedding is in both models; at inference every state is "
            "unknown, so the branch never runs (in training it runs the Transformer a second "
            "time)."]  # fmt: skip
