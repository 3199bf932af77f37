"""LCM against baselines and controls on both synthetic tiers: the README's "Results".

    python bench/compare_models.py --device cuda --jobs 8 --out bench/results/compare-h200-400
    python bench/compare_models.py --device cpu --jobs 2 --out OUT     # the same on 2 cores

The default profile (400 train images per tier, 40 epochs, where the curves have flattened)
took 96 s on one H200 with 8 runs at a time, plus 71 s for the recipe study; ``--profile
saturated`` (2000 images, 30 epochs) shows both tiers saturate with more data.

Every arm trains on the same data (each tier's train split, decoded once into memory), with
the same backbone, image size, batch, epochs and seeds, through the library's trainer
(:func:`lcm.trainer.build_trainer` / :func:`train_step`), and is scored (mAP of the final raw
weights) on the tier's val split after every epoch, which gives the curves.

Arms: ``gap``; ``gap`` given LCM's MACs (more epochs); ``gap_mlp`` (an MLP head about as large
as LCM's); ``lcm``; ``lcm_aux`` (LCM's auxiliary head, read from the same runs); ``lcm_sum``
(fusion by sum); ``lcm_noctx`` (no context tokens); ``q2l``. All arms share one recipe; the
recipe study then adds each switch alone to the plain recipe for LCM and ``gap`` (while the
shared recipe is empty, the comparison's own runs are the plain ones and are not run twice).

Statistics per arm and tier: mean and sd over seeds, the 95% interval of the difference to
``gap`` (paired by seed: t over the per-seed differences), the look-alike classes' AP. A run
appends its row to ``runs.jsonl`` as it ends, so a cut-off call keeps what finished and a
rerun skips it. ``--budget`` ends the call at the first run to finish after that many
seconds (the runs then in flight are lost); ``--report-only`` starts no run and rewrites the
table and the curves from ``runs.jsonl``.

One script (a little over 300 lines) because the arms, the scheduling and the tables are read
together when checking how a README figure was made.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.timing import progress  # noqa: E402

PROFILES: dict[str, dict[str, Any]] = {
    "full": {"n_train": 400, "n_val": 500, "size": 128, "epochs": 40, "seeds": 5, "batch": 128},
    "saturated": {
        "n_train": 2000,
        "n_val": 500,
        "size": 128,
        "epochs": 30,
        "seeds": 5,
        "batch": 128,
    },
    "smoke": {"n_train": 32, "n_val": 32, "size": 32, "epochs": 1, "seeds": 2, "batch": 16},
}
from lcm.config import FIRST_RECONSTRUCTION  # noqa: E402
from lcm.studies.grids import BASE_TRAIN  # noqa: E402  (the studies' recipe too)

# Every arm's shared shape, fixed (the studies' BASE_MODEL follows the default design; the
# arms here name their reads and widths, so runs.jsonl rows stay comparable across changes).
MODEL = {"backbone": "resnet18", "dim": 128, "heads": 8, "ffn": 256, "depth": 3, "dropout": 0.1}
TRAIN = BASE_TRAIN
# The shared recipe: a switch joins only when the recipe study shows it helps. On the GPU at
# 400 images none did (head_lr 2e-4: -6.2 mAP for LCM; the others within noise): none kept.
RECIPE: dict[str, dict[str, Any]] = {}
SWITCHES = {
    "head_lr": {"train": {"head_lr": 2e-4}},
    "reinit_layers": {"model": {"reinit_layers": True}},
    "prior_bias": {"model": {"prior_bias": True}},
    "label_embed": {"model": {"label_embed": True}},
}
# The redesign's hygiene (README "The model"): LayerNorm on the tokens, embeddings and label
# queries at unit scale, cosine prototype scores with a learned temperature.
HYGIENE = {"token_norm": True, "embed_init": 1.0, "prototype_score": "cosine"}
V1 = {"arch": "lcm", "context_read": "attend", "readout": "context", **HYGIENE}
V2 = {"arch": "lcm", "context_read": "direct", "readout": "context", **HYGIENE}
V1S = {**V1, "ffn": 192}  # FFN x0.75 (2048 -> 1536 at scale): 71.4M, inside the size band
# V5: V1's projected attention over the feature map + position code instead of the
# prototypes' tokens; FFN x0.75 for the size band
V5S = {**V1, "context_read": "attend_map", "ffn": 192}
FIRST = {"arch": "lcm", **FIRST_RECONSTRUCTION}
ARMS: dict[str, dict[str, Any]] = {
    "gap": {"arch": "gap"},
    "gap_eqmacs": {"arch": "gap"},  # epochs scaled by LCM's MACs / gap's
    "gap_mlp": {"arch": "gap_mlp", "mlp_hidden": 512},
    # the first reconstruction, spelled out: BASE_MODEL holds the current default
    "lcm": FIRST,
    "lcm_sum": {"arch": "lcm", **FIRST_RECONSTRUCTION, "fusion": "sum"},
    "lcm_noctx": {"arch": "lcm", **FIRST_RECONSTRUCTION, "context_tokens": False},
    # the redesign's variants (README "Results": screening)
    "lcm_hyg": {"arch": "lcm", **FIRST_RECONSTRUCTION, **HYGIENE},  # today's read, hygiene
    "lcm_v1": V1,  # 74.5M at ResNet-101 scale: outside the paper's +-3%
    "lcm_v1s": V1S,
    "lcm_v2": V2,
    "lcm_v2_sum": {**V2, "readout": "sum"},  # the readout's share of V2
    "lcm_v2_lab": {**V2, "label_embed": True},  # V2 with a label-identity embedding
    "lcm_v5s": V5S,  # added after the first screening seed
    # V6 (rule addendum 4): V5 whose context-aware tokens read the feature map again inside
    # every Transformer layer (model.reread), as Query2Label's queries do
    "lcm_v6s": {**V5S, "reread": True},
    "q2l": {"arch": "q2l"},
    # rule addendum 5: V5 trained by the main head's loss alone (no auxiliary loss on the
    # class-aware features; and no partial-label branch either), as q2l and gap are trained
    "lcm_v5s_a0": V5S,
    "lcm_v5s_a0b0": V5S,
    # rule addendum 6: the same loss (alpha 0) with the first reconstruction and with V1s
    "lcm_a0": FIRST,
    "lcm_v1s_a0": V1S,
}
# Loss weights of the arms that do not train with the paper's (alpha 1; beta 0.1 for LCM)
ARM_LOSS: dict[str, dict[str, float]] = {
    "lcm_v5s_a0": {"alpha": 0.0},
    "lcm_v5s_a0b0": {"alpha": 0.0, "beta": 0.0},
    "lcm_a0": {"alpha": 0.0},
    "lcm_v1s_a0": {"alpha": 0.0},
}
TIERS = ("context", "interaction")
# those present are drawn, each in its own colour in every figure
CURVE_ARMS = ("gap", "gap_mlp", "lcm", "lcm_v1s", "lcm_v2", "q2l", "lcm_v5s_a0")


@dataclass(frozen=True)
class Job:
    tier: str
    arm: str
    recipe: str  # "recipe" (the shared one), "plain" or "plain+<switch>"
    seed: int
    epochs: int
    batch: int
    lr: float = TRAIN["lr"]

    @property
    def key(self) -> str:
        return f"{self.tier}|{self.arm}|{self.recipe}|{self.seed}"


def _merge(*parts: dict) -> dict:
    out: dict = {}
    for part in parts:
        for section, values in part.items():
            out[section] = {**out.get(section, {}), **values}
    return out


def job_params(job: Job, size: int, device: str) -> Any:
    from lcm.config import params_from_dict

    recipe = RECIPE if job.recipe == "recipe" else {}
    if job.recipe.startswith("plain+"):
        recipe = SWITCHES[job.recipe.split("+", 1)[1]]
    base = {
        "model": {**MODEL, **ARMS[job.arm]},
        "train": {**TRAIN, "lr": job.lr, "epochs": job.epochs, "batch_size": job.batch,
                  "image_size": size, "seed": job.seed, "device": device},
        "loss": {"beta": 0.1 if job.arm.startswith("lcm") else 0.0, **ARM_LOSS.get(job.arm, {})},
    }  # fmt: skip
    return params_from_dict(_merge(base, recipe))


def gmacs(arm: str, size: int, num_classes: int) -> float:
    import torch

    from lcm.config import ModelConfig
    from lcm.models.complexity import count_macs
    from lcm.models.registry import build_model

    with torch.device("meta"):
        model = build_model(ModelConfig(**{**MODEL, **ARMS[arm]}), num_classes)
    return count_macs(model, size)[0] / 1e9


# ---------------------------------------------------------------------------------------- run
def run_job(
    job: Job, data_file: str, size: int, device_name: str, score_every: int = 1
) -> dict[str, Any]:
    """Train one arm in memory; val mAP (and the aux head's) after every ``score_every``-th
    epoch and each of the last five (the final metrics do not depend on it)."""
    import torch

    from lcm.studies.inmemory import train_in_memory

    torch.set_num_threads(1)
    row = train_in_memory(job_params(job, size, device_name), data_file, score_every=score_every)
    return {"key": job.key, **job.__dict__, **row}


def _run_packed(args: tuple) -> dict[str, Any]:
    return run_job(*args)


# ------------------------------------------------------------------------------------- report
def _stats(values: list[float]) -> tuple[float, float]:
    arr = 100 * np.asarray(values)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def _diff_ci(rows: list[dict], base: list[dict], key: str) -> str:
    from scipy import stats

    by_seed = {r["seed"]: r["mAP"] for r in base}
    diffs = [100 * (r[key] - by_seed[r["seed"]]) for r in rows if r["seed"] in by_seed]
    if len(diffs) < 2:
        return "-"
    m, sd = float(np.mean(diffs)), float(np.std(diffs, ddof=1))
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return f"{m:+.1f} [{m - half:+.1f}, {m + half:+.1f}]"


def _lookalike_ap(row: dict, roles: dict[str, str], key: str = "per_class") -> float:
    vals = [
        v
        for n, v in row[key].items()
        if roles.get(n) == "lookalike" and v is not None and not math.isnan(v)
    ]
    return float(np.mean(vals)) if vals else float("nan")


def write_report(out: Path, rows: list[dict], roles: dict[str, dict], info: dict) -> str:
    lines = [info["header"], ""]
    for tier in TIERS:
        tier_rows = [r for r in rows if r["tier"] == tier]
        if not tier_rows:
            continue
        base = [r for r in tier_rows if r["arm"] == "gap" and r["recipe"] == "recipe"]
        q2l = [r for r in tier_rows if r["arm"] == "q2l" and r["recipe"] == "recipe"]
        lines += [f"### {tier} tier", "",
                  "| arm | seeds | epochs | GMACs / image | mAP | Δ mAP vs gap [95% CI] | "
                  "Δ mAP vs q2l [95% CI] | look-alike AP | train mAP | train look-alike AP |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for arm in [*ARMS, "lcm_aux"]:
            src = "lcm" if arm == "lcm_aux" else arm
            arm_rows = [r for r in tier_rows if r["arm"] == src and r["recipe"] == "recipe"]
            if not arm_rows:
                continue
            key, pc = ("aux_mAP", "aux_per_class") if arm == "lcm_aux" else ("mAP", "per_class")
            m, sd = _stats([r[key] for r in arm_rows])
            la = _stats([_lookalike_ap(r, roles[tier], pc) for r in arm_rows])
            train = "- | -"  # the final weights on the train split (main head only)
            if arm != "lcm_aux" and all("train_mAP" in r for r in arm_rows):
                tm = _stats([r["train_mAP"] for r in arm_rows])
                tla = _stats([_lookalike_ap(r, roles[tier], "train_per_class") for r in arm_rows])
                train = f"{tm[0]:.1f} ± {tm[1]:.1f} | {tla[0]:.1f} ± {tla[1]:.1f}"
            lines.append(
                f"| {arm} | {len(arm_rows)} | {arm_rows[0]['epochs']} | "
                f"{info['gmacs'][tier][src]:.3f} | {m:.1f} ± {sd:.1f} | "
                f"{_diff_ci(arm_rows, base, key) if arm != 'gap' else '-'} | "
                f"{_diff_ci(arm_rows, q2l, key) if arm != 'q2l' else '-'} | "
                f"{la[0]:.1f} ± {la[1]:.1f} | {train} |"
            )
        lines.append("")
    for tier in TIERS:  # per-class AP of the look-alikes, the classes the tiers are about
        names = [n for n, role in roles.get(tier, {}).items() if role == "lookalike"]
        present = {r["arm"] for r in rows if r["tier"] == tier}
        arms = [a for a in [*ARMS, "lcm_aux"] if a.replace("_aux", "") in present]
        if not names or not arms:
            continue
        lines += [f"### look-alike AP per class, {tier} tier (mean over seeds)", "",
                  "| arm | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
        for arm in arms:
            src, pc = ("lcm", "aux_per_class") if arm == "lcm_aux" else (arm, "per_class")
            sel = [r for r in rows if r["tier"] == tier and r["arm"] == src
                   and r["recipe"] == "recipe" and pc in r]  # fmt: skip
            if sel:
                cells = [f"{100 * np.mean([r[pc][n] for r in sel]):.1f}" for n in names]
                lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        lines.append("")
    study = [r for r in rows if r["recipe"] != "recipe"]
    if study:
        lines += ["### recipe study (interaction tier)", "",
                  "| arm | recipe | seeds | mAP | Δ vs plain [95% CI] | look-alike AP |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        main = [r for r in rows if r["tier"] == "interaction" and r["recipe"] == "recipe"]
        for arm in ("lcm", "gap"):
            plain = [r for r in study if r["arm"] == arm and r["recipe"] == "plain"]
            if not plain and not RECIPE:  # the comparison's runs are the plain recipe
                plain = [r for r in main if r["arm"] == arm]
            recipes = ["plain", *(f"plain+{s}" for s in SWITCHES), *(["recipe"] if RECIPE else [])]
            for recipe in recipes:
                if recipe == "plain":
                    sel = plain
                else:
                    sel = [r for r in study + main if r["arm"] == arm and r["recipe"] == recipe]
                if not sel:
                    continue
                m, sd = _stats([r["mAP"] for r in sel])
                la = _stats([_lookalike_ap(r, roles["interaction"]) for r in sel])
                diff = _diff_ci(sel, plain, "mAP") if recipe != "plain" else "-"
                lines.append(f"| {arm} | {recipe} | {len(sel)} | {m:.1f} ± {sd:.1f} | {diff} | "
                             f"{la[0]:.1f} ± {la[1]:.1f} |")  # fmt: skip
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    _plot_curves(out, rows)
    return table


def _plot_curves(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiers = [t for t in TIERS if any(r["tier"] == t for r in rows)]  # no empty panels
    fig, axes = plt.subplots(1, len(tiers), figsize=(5.5 * len(tiers), 4), squeeze=False)
    for ax, tier in zip(axes[0], tiers, strict=True):
        for colour, arm in enumerate(CURVE_ARMS):  # an arm keeps its colour in every figure
            sel = [
                r for r in rows if r["tier"] == tier and r["arm"] == arm and r["recipe"] == "recipe"
            ]
            if not sel:
                continue
            sel = [r for r in sel if len(r["curve"]) == len(sel[0]["curve"])]
            curves = 100 * np.asarray([r["curve"] for r in sel])
            epochs = sel[0].get("curve_epochs") or np.arange(1, curves.shape[1] + 1)
            seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
            ax.plot(epochs, curves.mean(0), f"C{colour}", label=f"{arm} ({seeds})")
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=f"C{colour}", alpha=0.15)
        ax.set(title=f"{tier} tier", xlabel="epoch", ylabel="val mAP (raw weights)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------- main
def plan(args: argparse.Namespace, ratio: float) -> list[Job]:
    """Every run: the comparison, then the recipe study, each seed-major so that a cut-off
    call has whole seeds of every arm."""
    jobs = []
    eq_epochs = max(args.epochs, round(args.epochs * ratio))
    for seed in range(args.seeds):
        for tier in args.tiers:
            for arm in args.arms:
                epochs = eq_epochs if arm == "gap_eqmacs" else args.epochs
                jobs.append(Job(tier, arm, "recipe", seed, epochs, args.batch, args.lr))
    for seed in range(args.seeds if args.study and "interaction" in args.tiers else 0):
        for arm in ("lcm", "gap"):
            for recipe in ["plain", *(f"plain+{s}" for s in SWITCHES)]:
                if arm == "gap" and recipe in ("plain+reinit_layers", "plain+label_embed"):
                    continue  # nothing for these switches to act on
                if recipe == "plain" and not RECIPE and arm in args.arms:
                    continue  # with no shared recipe, plain is the comparison's own run
                jobs.append(Job("interaction", arm, recipe, seed, args.epochs, args.batch, args.lr))
    return jobs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compare")
    ap.add_argument("--profile", choices=sorted(PROFILES), default="full")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (a GPU fits several)")
    ap.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--no-study", dest="study", action="store_false")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: the call ends at the first run to end after them")  # fmt: skip
    ap.add_argument("--report-only", action="store_true",
                    help="start no run; rewrite the table and curves from runs.jsonl")  # fmt: skip
    ap.add_argument("--data", type=Path, default=None, help="data cache [default: OUT/data]")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the tiers' generator")
    ap.add_argument(
        "--score-every",
        type=int,
        default=1,
        help="val curve every N epochs (and the last 5); final metrics unchanged",
    )
    ap.add_argument("--lr", type=float, default=TRAIN["lr"], help="peak learning rate, every arm")
    for name in ("n_train", "n_val", "size", "epochs", "seeds", "batch"):
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = ap.parse_args()
    for name, value in PROFILES[args.profile].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    from lcm.runtime import select_device
    from lcm.studies.inmemory import build_tier

    device = select_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = args.out / "runs.jsonl"
    done = {}
    if results.exists():
        done = {r["key"]: r for r in map(json.loads, results.read_text().splitlines())}
    # the report covers every run in OUT, so every tier and arm there needs its data and MACs
    tiers = [t for t in TIERS if t in args.tiers or any(r["tier"] == t for r in done.values())]
    arms = {*args.arms, "gap", "lcm", *(r["arm"] for r in done.values())}
    data_dir = args.data or args.out / "data"
    data = {t: str(build_tier(data_dir, t, args.n_train, args.n_val, args.size, args.data_seed))
            for t in tiers}  # fmt: skip  # cached: reused when it exists
    n_cls = {t: len(torch.load(f, weights_only=True)["classes"]) for t, f in data.items()}
    macs = {t: {a: gmacs(a, args.size, n_cls[t]) for a in ARMS if a in arms} for t in tiers}
    ratio = max(m["lcm"] / m["gap"] for m in macs.values())
    settings = {k: getattr(args, k) for k in ("n_train", "n_val", "size", "epochs", "batch")}
    if args.data_seed:  # absent for seed 0, so the results before the option stay comparable
        settings["data_seed"] = args.data_seed
    if args.lr != TRAIN["lr"]:  # likewise
        settings["lr"] = args.lr
    settings_file = args.out / "settings.json"
    if results.exists() and settings_file.exists():
        before = json.loads(settings_file.read_text())
        if before != settings:
            raise SystemExit(f"{args.out} holds runs made with {before}, not {settings}; "
                             "use another --out")  # fmt: skip
    settings_file.write_text(json.dumps(settings) + "\n")
    todo = [] if args.report_only else [j for j in plan(args, ratio) if j.key not in done]
    progress(f"{len(todo)} runs to do ({len(done)} done before) on {name}, {args.jobs} at a time")
    if todo:  # a pool's spawned workers each import torch: none for a report or a finished grid
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(args.jobs) as pool, results.open("a") as sink:
            pending = [(j, data[j.tier], args.size, device.type, args.score_every) for j in todo]
            it = pool.imap_unordered(_run_packed, pending)
            for k, row in enumerate(it, 1):
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                done[row["key"]] = row
                progress(f"[{k}/{len(todo)}] {row['key']}: mAP {100 * row['mAP']:.1f} "
                         f"({row['seconds']:.0f} s)")  # fmt: skip
                if args.budget is not None and time.perf_counter() - started > args.budget:
                    progress("budget spent: stopping; rerun to continue")
                    pool.terminate()
                    break
    roles = {t: torch.load(f, weights_only=True)["roles"] for t, f in data.items()}
    rows = list(done.values())  # every call's runs, not only this call's
    seeds = sorted({r["seed"] for r in rows})
    header = (
        f"{args.n_train} train / {args.n_val} val images per tier at {args.size} px "
        f"(data seed {args.data_seed}), ResNet-18 "
        f"from scratch, batch {args.batch}, AdamW + OneCycle lr {args.lr:g}, "
        f"{args.epochs} epochs (gap_eqmacs: x{ratio:.2f} by MACs), seeds "
        f"{', '.join(map(str, seeds))}, on {name}; mAP of the final raw weights. Shared recipe: "
        f"{json.dumps(RECIPE)}. Runs' own time {sum(r['seconds'] for r in rows):.0f} s in all; "
        f"this call's wall time {time.perf_counter() - started:.0f} s."
    )
    print(write_report(args.out, rows, roles, {"header": header, "gmacs": macs}))


if __name__ == "__main__":
    main()
