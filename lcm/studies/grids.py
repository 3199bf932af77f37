"""The paper's studies (its supplement, Figs. 1-2 and Table 2) as grids over our benchmark.

A study sweeps one setting of LCM (``partial`` sweeps two: the missing-label ratio and beta)
around one base configuration, the recipe of the README's comparison: ResNet-18 from scratch,
token width 128, depth 3, r = 0.1, alpha = 1, beta = 0.1, AdamW + OneCycle at lr 2e-3, no
EMA. The base configuration is a point of every single-setting study, so it trains once and
serves all four (runs are keyed by their full configuration).

A *profile* fixes the data and the schedule: ``full`` is the comparison's (interaction tier,
400 train / 500 val images, 128 px, 40 epochs, batch 128, 5 seeds); ``quick`` is sized so a
study's quick grid finishes within an hour on a 2-core CPU (96 px, 20 epochs, batch 64,
2 seeds); ``b32`` is the full profile at the batch ``params.yaml`` ships (32), the recipe at
which the default learns the interaction tier and the redesign was decided (2 seeds; ~15-30
minutes a run on one CPU core); ``tiny`` is for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lcm.errors import ConfigError

# The comparison's recipe (README "Results"): bench/compare_models.py uses the same two.
BASE_MODEL: dict[str, Any] = {
    "arch": "lcm", "backbone": "resnet18", "dim": 128, "heads": 8, "ffn": 256, "depth": 3,
    "dropout": 0.1, "mask_ratio": 0.1,
}  # fmt: skip
BASE_TRAIN: dict[str, Any] = {"lr": 2e-3, "weight_decay": 1e-4, "ema_decay": None, "amp": "auto"}
BASE_LOSS: dict[str, Any] = {"alpha": 1.0, "beta": 0.1}


@dataclass(frozen=True)
class Profile:
    """Data and schedule of every run in a study call."""

    name: str
    tier: str
    n_train: int
    n_val: int
    size: int
    epochs: int
    batch: int
    seeds: int  # default number of seeds
    model: dict[str, Any] = field(default_factory=dict)  # overrides of BASE_MODEL

    def settings(self) -> dict[str, Any]:
        """What makes two runs comparable (the seed and the swept settings aside)."""
        return {"profile": self.name, "tier": self.tier, "n_train": self.n_train,
                "n_val": self.n_val, "size": self.size, "epochs": self.epochs,
                "batch": self.batch}  # fmt: skip


_FULL = Profile("full", "interaction", 400, 500, 128, 40, 128, 5)
PROFILES: dict[str, Profile] = {
    "full": _FULL,
    "quick": Profile("quick", "interaction", 400, 500, 96, 20, 64, 2),
    "b32": replace(_FULL, name="b32", batch=32, seeds=2),
    "tiny": Profile(
        "tiny", "interaction", 48, 32, 32, 1, 16, 2, {"dim": 32, "heads": 4, "ffn": 64}
    ),  # fmt: skip
}


@dataclass(frozen=True)
class Study:
    """One of the paper's studies: which setting moves, over which values, and what the
    paper found."""

    name: str
    key: str  # the swept setting, SECTION.KEY
    label: str  # axis label
    full: tuple[float, ...]
    quick: tuple[float, ...]
    paper_best: float | None
    finding: str  # the paper's finding, in its words as far as the supplement gives them
    # partial only: the missing-label ratios, full and quick grids
    missing_full: tuple[float, ...] = ()
    missing_quick: tuple[float, ...] = ()

    def values(self, grid: str) -> tuple[float, ...]:
        return {"full": self.full, "quick": self.quick}[grid]

    def missing(self, grid: str) -> tuple[float, ...]:
        return {"full": self.missing_full, "quick": self.missing_quick}[grid]


STUDIES: dict[str, Study] = {
    s.name: s
    for s in (
        Study("depth", "model.depth", "Transformer depth (layers)", (1, 2, 3, 4, 5, 6),
              (1, 3, 6), 3,
              "depth 3 best; 1 layer already competitive; more layers drop slightly "
              "(over-fitting)"),
        Study("mask-ratio", "model.mask_ratio", "mask ratio r", (0, 0.1, 0.3, 0.5, 0.9),
              (0, 0.1, 0.5), 0.1,
              "r = 0.1 best; r = 0 fails to model label correlations; large r hurts"),
        Study("alpha", "loss.alpha", "alpha (auxiliary head weight)", (0, 0.5, 1, 2, 3),
              (0, 1, 3), 1.0,
              "alpha = 1 best; slightly larger changes little; extreme values degrade"),
        Study("beta", "loss.beta", "beta (partial-label branch weight)",
              (0, 0.1, 0.2, 0.3, 0.5), (0, 0.1, 0.5), 0.1,
              "beta = 0.1 best; above 0.1 mAP falls as beta grows"),
        Study("partial", "loss.beta", "beta (partial-label branch weight)",
              (0, 0.1, 0.2, 0.3, 0.4, 0.5), (0.1, 0.4), None,
              "more missing labels want a larger beta: best 0.1 at 10% missing, 0.3 at 50%, "
              "0.4 at 90%", missing_full=(0.1, 0.5, 0.9), missing_quick=(0.1, 0.9)),
    )
}  # fmt: skip

# Paper Table 2 (COCO, partial labels): (missing ratio, beta) -> mAP.
PAPER_PARTIAL: dict[tuple[float, float], float] = {
    (0.1, 0.1): 83.5, (0.5, 0.1): 80.4, (0.5, 0.3): 80.9, (0.9, 0.1): 72.0, (0.9, 0.4): 73.1,
}  # fmt: skip
PAPER_PARTIAL_BEST = {0.1: 0.1, 0.5: 0.3, 0.9: 0.4}


@dataclass(frozen=True)
class Point:
    """One run of a study: the swept value (and missing ratio) and the seed."""

    study: str
    value: float
    seed: int
    missing: float | None = None


def plan(study: Study, grid: str, seeds: int, values: tuple[float, ...] | None = None,
         missing: tuple[float, ...] | None = None) -> list[Point]:  # fmt: skip
    """Every point of a study, seed-major (a cut-off call holds whole seeds of the grid)."""
    values = tuple(values) if values else study.values(grid)
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1, got {seeds}")
    _check_values(study, values)
    if study.name != "partial":
        return [Point(study.name, v, s) for s in range(seeds) for v in values]
    ratios = tuple(missing) if missing else study.missing(grid)
    for m in ratios:
        if not 0.0 < m < 1.0:
            raise ConfigError(f"missing ratio {m} must lie in (0, 1)")
    return [Point(study.name, v, s, m) for s in range(seeds) for m in ratios for v in values]


def _check_values(study: Study, values: tuple[float, ...]) -> None:
    for v in values:
        if study.name == "depth" and (v != int(v) or v < 1):
            raise ConfigError(f"depth {v}: expected a whole number of layers >= 1")
        if study.name == "mask-ratio" and not 0 <= v <= 1:
            raise ConfigError(f"mask ratio {v} must lie in [0, 1]")
        if v < 0:
            raise ConfigError(f"{study.name} value {v} must not be negative")


def point_params(point: Point, profile: Profile, device: str) -> dict[str, Any]:
    """The full parameter mapping of one run (``lcm.config.params_from_dict`` input)."""
    model = {**BASE_MODEL, **profile.model}
    loss = dict(BASE_LOSS)
    train = {**BASE_TRAIN, "epochs": profile.epochs, "batch_size": profile.batch,
             "image_size": profile.size, "seed": point.seed, "device": device}  # fmt: skip
    section, key = STUDIES[point.study].key.split(".")
    value = int(point.value) if key == "depth" else float(point.value)
    {"model": model, "loss": loss}[section][key] = value
    if point.missing is not None:
        train["missing"] = point.missing
    return {"model": model, "loss": loss, "train": train}


def memberships(settings: dict[str, Any], params: dict[str, Any]) -> list[Point]:
    """Every study point a run is: the base configuration is a point of each single-setting
    study; any other run belongs to the one study whose setting it moves."""
    profile = PROFILES.get(settings.get("profile", ""))
    if profile is None or profile.settings() != settings:
        return []  # made by a profile this version no longer defines
    seed, device = params["train"]["seed"], params["train"]["device"]
    found = []
    for study in STUDIES.values():
        section, key = study.key.split(".")
        missing = params["train"].get("missing")
        if (study.name == "partial") != (missing is not None):
            continue
        point = Point(study.name, float(params[section][key]), seed, missing)
        if point_params(point, profile, device) == params:
            found.append(point)
    return found
