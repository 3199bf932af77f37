"""The `lcm` command line: a thin layer that parses options and calls `lcm/` and `flows/`.

Every user-caused problem arrives here as an `LcmError` and leaves as one line on stderr
with exit status 1. Heavy imports (torch, prefect) happen inside the commands so that
`lcm --help` stays fast.

One file for every command (longer than the other modules): each command is a screen of
option parsing over a call into `lcm/` or `flows/`, and `lcm --help` maps to this file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from lcm.errors import LcmError
from lcm.progress import progress_bar

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class App(typer.Typer):
    """Typer app that reports the project's own errors as one line and exit status 1."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except LcmError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(1)


app = App(help="Multi-label recognition with latent context (LCM).", no_args_is_help=True)


class _UserErrorFilter(logging.Filter):
    """Drops Prefect's ERROR records (with traceback) about an LcmError: the CLI reports
    those itself, as one line. Unexpected exceptions still show in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.exc_info and isinstance(record.exc_info[1], LcmError):
            return False
        text = record.getMessage()
        return not any(f"{name}(" in text or f"{name}:" in text for name in _error_names())


def _error_names() -> set[str]:
    names, todo = set(), [LcmError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def _quiet_flow_errors() -> None:
    """Call before running a flow (Prefect configures its loggers when imported)."""
    import prefect  # noqa: F401

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _UserErrorFilter) for f in logger.filters):
            logger.addFilter(_UserErrorFilter())


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Multi-label recognition with latent context (LCM)."""
    from rich.logging import RichHandler

    # The library logs through `logging`; show its INFO lines (epochs, skipped inputs).
    handler = RichHandler(console=err, show_path=False, show_time=False, markup=False)
    lib = logging.getLogger("lcm")
    lib.handlers[:] = [handler]
    lib.setLevel(logging.DEBUG if verbose else logging.INFO)
    lib.propagate = False


data_app = App(help="Data stages: synth, prepare, shard, mask; index.", no_args_is_help=True)
prepare_app = App(help="Raw annotations -> manifest.parquet + classes.json.", no_args_is_help=True)
report_app = App(help="Reports: model size.", no_args_is_help=True)
export_app = App(help="Export a trained model for serving.", no_args_is_help=True)
visualize_app = App(help="The paper's pictures: attention maps, t-SNE.", no_args_is_help=True)
app.add_typer(data_app, name="data")
data_app.add_typer(prepare_app, name="prepare")
app.add_typer(report_app, name="report")
app.add_typer(export_app, name="export")
app.add_typer(visualize_app, name="visualize")
store_app = App(help="The prediction store: migrate, prune, compact.", no_args_is_help=True)
app.add_typer(store_app, name="store")


# --------------------------------------------------------------------------------------- data
@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="Output root (COCO layout).")],
    n_train: Annotated[int, typer.Option(min=1)] = 4000,
    n_val: Annotated[int, typer.Option(min=1)] = 1000,
    size: Annotated[
        int | None,
        typer.Option(min=32, help="Image side in pixels [default: 96; interaction: 128]."),
    ] = None,
    seed: int = 0,
    workers: Annotated[int, typer.Option(min=1, help="Rendering processes.")] = 2,
    tier: Annotated[
        str, typer.Option(help="context (the default story) | interaction (XOR of anchors).")
    ] = "context",
) -> None:
    """Generate the synthetic benchmark in the COCO layout (byte-identical per seed)."""
    from lcm.data.synthetic import generate_synthetic

    if size is None:
        size = 128 if tier == "interaction" else 96
    with progress_bar("rendering") as update:
        summary = generate_synthetic(
            out_dir,
            n_train=n_train,
            n_val=n_val,
            size=size,
            seed=seed,
            progress=update,
            workers=workers,
            tier=tier,
        )
    out.print(str(summary))


@data_app.command("ceilings")
def data_ceilings(
    raw: Annotated[Path, typer.Argument(help="Root written by `lcm data synth`.")],
    probe: Annotated[
        bool, typer.Option(help="Also probe a briefly trained, frozen `gap` backbone (slow).")
    ] = False,
) -> None:
    """What a tier leaves to learn: context-only / appearance-only ceilings of the look-alike
    classes, and linear vs non-linear models on per-glyph counts for every class."""
    from lcm.data.synthetic.ceilings import (
        format_ceilings_table,
        format_count_table,
        measure_background_cue,
        measure_ceilings,
        measure_count_ceilings,
    )

    rows = measure_ceilings(raw)
    scene_acc, rows = measure_background_cue(raw, rows)
    out.print(format_ceilings_table(rows), highlight=False)
    if scene_acc is not None:
        out.print(f"background pixels alone name the scene in {100 * scene_acc:.1f}% of val images")
    out.print("")
    out.print("per-glyph counts, linear vs non-linear:", highlight=False)
    out.print(format_count_table(measure_count_ceilings(raw)), highlight=False)
    if probe:
        from lcm.studies.probe import format_probe_table, probe_backbone

        with progress_bar("probing") as update:
            table = probe_backbone(raw, progress=update)
        out.print("frozen `gap` backbone, pooled features, linear vs MLP probe:", highlight=False)
        out.print(format_probe_table(table), highlight=False)


@prepare_app.command("coco")
def prepare_coco(
    out_dir: Annotated[Path, typer.Option("--out")],
    root: Annotated[
        Path | None, typer.Option(help="COCO root: annotations/instances_<split>.json, images/.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="With --root: train, val, train2017 ...")
    ] = None,
    annotations: Annotated[
        Path | None, typer.Option(help="instances_*.json (not with --root).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Image directory the file names are relative to [default: root/images/split]."
        ),
    ] = None,
) -> None:
    """COCO annotations -> manifest (class index = rank of the category id).

    Give --root and --split, or --annotations and --images."""
    from lcm.data.coco import coco_split
    from lcm.data.coco import prepare_coco as run
    from lcm.errors import ConfigError

    if (root is None) == (annotations is None):
        raise ConfigError("lcm data prepare coco: give --root and --split, or --annotations")
    if root is not None:
        if split is None:
            raise ConfigError("lcm data prepare coco: --root needs --split")
        annotations, split_images = coco_split(root, split)
        images = images or split_images
    elif images is None:
        raise ConfigError("lcm data prepare coco: --annotations needs --images")
    out.print(run(annotations, images, out_dir).summary(), highlight=False)


@prepare_app.command("voc")
def prepare_voc(
    root: Annotated[Path, typer.Option(help="VOCdevkit/VOC2007 (or VOC2012).")],
    split: Annotated[str, typer.Option(help="ImageSets/Main/<split>.txt")] = "trainval",
    out_dir: Annotated[Path, typer.Option("--out")] = Path("data/prepared/voc"),
    images: Annotated[
        Path | None, typer.Option(help="Image directory [default: root/JPEGImages].")
    ] = None,
) -> None:
    """VOC XML annotations -> manifest (difficult-only classes are unknown)."""
    from lcm.data.voc import prepare_voc as run

    out.print(run(root, split, out_dir, images).summary(), highlight=False)


@data_app.command("shard")
def data_shard(
    prepared: Annotated[Path, typer.Option(help="Directory with manifest.parquet.")],
    images: Annotated[Path, typer.Option(help="Image root.")],
    out_dir: Annotated[Path, typer.Option("--out")],
    max_side: Annotated[int, typer.Option(min=0, help="0 keeps the original size.")] = 128,
    shard_size: Annotated[int, typer.Option(min=1)] = 1000,
    workers: Annotated[int | None, typer.Option(min=1, help="Default: all cores.")] = None,
) -> None:
    """Prepared manifest + images -> WebDataset shards and _info.json."""
    from lcm.data.shard_writer import write_shards

    with progress_bar("sharding") as update:
        info = write_shards(
            prepared,
            images,
            out_dir,
            max_side=max_side or None,
            shard_size=shard_size,
            workers=workers,
            progress=update,
        )
    out.print(info.summary(), highlight=False)


@data_app.command("index")
def data_index(
    shards: Annotated[str, typer.Argument(help="Shard directory, glob, brace list or URL(s).")],
    classes: Annotated[Path, typer.Option(help="JSON list of the class names, in index order.")],
    out_file: Annotated[Path, typer.Option("--out", help="The _info.json to write.")],
) -> None:
    """Write the _info.json of shards made by other tools (each read once, front to back)."""
    from lcm.data.indexing import index_shards

    with progress_bar("indexing") as update:
        info = index_shards(shards, classes, out_file, progress=update)
    out.print(
        f"{out_file}: {info.total} samples in {len(info.shards)} shards, "
        f"{info.num_classes} classes",
        highlight=False,
    )


@data_app.command("mask")
def data_mask(
    prepared: Annotated[Path, typer.Option(help="Train split's prepared directory.")],
    missing: Annotated[
        list[float],
        typer.Option(min=0.0, max=1.0, help="Share of targets hidden; repeat for several."),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory: missing-<m>.parquet each.")],
    seed: int = 0,
) -> None:
    """Hide a share of the training targets (partial-label protocol, SPEC section 4)."""
    from lcm.data.masks import make_masks

    for report in make_masks(prepared, missing, seed, out_dir):
        out.print(report.summary(), highlight=False)


# ------------------------------------------------------------------------------------ reports
@report_app.command("model")
def report_model(
    backbone: str = "resnet101",
    num_classes: int = 80,
    image_size: int = 448,
    depth: int = 3,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="A model field: model.KEY=VALUE (e.g. model.context_read=attend)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters and GMACs of LCM or a variant of it, its head alone, and `gap`."""
    from lcm.config import model_overrides
    from lcm.models.complexity import format_report, model_report

    rep = model_report(
        backbone=backbone, num_classes=num_classes, image_size=image_size, depth=depth,
        **model_overrides(overrides or []),
    )  # fmt: skip
    if as_json:
        out.print_json(json.dumps(rep))
    else:
        out.print(format_report(rep), highlight=False)


# ------------------------------------------------------------------------------ train / eval
@app.command("train")
def train(
    shards: Annotated[
        str, typer.Option(help="Train shards: directory, glob, brace list or URL(s).")
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Model directory.")],
    val_shards: Annotated[
        str | None, typer.Option(help="Validation shards (per-epoch mAP).")
    ] = None,
    no_val: Annotated[bool, typer.Option("--no-val", help="Skip per-epoch validation.")] = False,
    params_file: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a param: SECTION.KEY=VALUE.")
    ] = None,
    mask: Annotated[Path | None, typer.Option(help="Partial-label mask file.")] = None,
    masks: Annotated[
        Path | None,
        typer.Option(help="Mask directory of `lcm data mask`; train.missing picks the file."),
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from OUT's last checkpoint.")] = False,
    nproc: Annotated[int, typer.Option(min=1, help="DDP processes (launches torchrun).")] = 1,
    live_dir: Annotated[Path | None, typer.Option(help="dvclive directory.")] = Path("dvclive"),
    no_live: Annotated[bool, typer.Option("--no-live", help="Do not log with dvclive.")] = False,
    record_keys: Annotated[bool, typer.Option(hidden=True)] = False,
) -> None:
    """Train a model (LCM or a baseline, by params) on shards; checkpoints go to OUT."""
    from lcm.config import load_params_with

    params = load_params_with(params_file, overrides)  # a bad file fails before torch loads
    from lcm.train_request import TrainRequest, check_request, mask_for

    request = TrainRequest(
        params=params,
        train_shards=shards,
        out_dir=out_dir,
        val_shards=None if no_val else val_shards,
        mask=mask_for(params, mask, masks),
        resume=resume,
        live_dir=None if no_live else live_dir,
        nproc=nproc,
        record_keys=record_keys,
    )
    resolved = check_request(request)  # before a Prefect server or a process group starts
    from flows.train import train_flow  # Prefect loads only for a request that can run

    _quiet_flow_errors()
    history = train_flow(resolved)
    if history:
        last = history[-1]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k.startswith("val"))
        out.print(f"trained {out_dir}: {int(last['epoch'])} epochs; {shown}", highlight=False)


@app.command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="Model directory from `lcm train`.")],
    shards: Annotated[str, typer.Option(help="Shards: directory, glob, brace list or URL(s).")],
    out_dir: Annotated[Path, typer.Option("--out")],
    weights: Annotated[str, typer.Option(help="raw | ema (fixed up front).")] = "raw",
    batch_size: int = 64,
    num_workers: int = 2,
    device: str = "auto",
    calibrate: Annotated[
        bool, typer.Option(help="Store per-class F1 thresholds in the model directory.")
    ] = True,
) -> None:
    """Evaluate a model: metrics.json, per_class.csv, PR curves, calibrated thresholds."""
    from lcm.evaluate import EvaluateRequest, check_evaluate
    from lcm.handoff import hand_over

    if weights not in ("raw", "ema"):
        raise typer.BadParameter("expected raw or ema", param_hint="--weights")
    request = EvaluateRequest(checkpoint=checkpoint, shards=shards, out_dir=out_dir,
                              weights=weights, batch_size=batch_size, num_workers=num_workers,
                              device=device, calibrate=calibrate)  # fmt: skip
    resolved = check_evaluate(request)  # before a Prefect server starts
    from flows.evaluate import evaluate_flow

    _quiet_flow_errors()
    metrics = evaluate_flow(
        checkpoint=str(checkpoint),
        shards=shards,
        out_dir=str(out_dir),
        weights=weights,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        calibrate=calibrate,
        checked=hand_over(resolved),
    )
    out.print(
        f"{metrics['n_images']} images: mAP {metrics['mAP']:.4f}  CF1 {metrics['CF1']:.4f}  "
        f"OF1 {metrics['OF1']:.4f}  -> {out_dir}",
        highlight=False,
    )


@export_app.command("onnx")
def export_onnx_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Model directory from `lcm train`.")],
    out_file: Annotated[Path, typer.Option("--out", help="The .onnx file to write.")],
    weights: Annotated[str, typer.Option(help="raw | ema")] = "raw",
) -> None:
    """Export a model as ONNX: normalised images -> sigmoid scores, dynamic batch size.

    The class names and the preprocessing (image size, mean, std) go into the file's
    metadata. The export is checked with onnxruntime against PyTorch at batch 1 and 3;
    nothing is written if they differ by 1e-4 or more.
    """
    from lcm.export import export_onnx

    res = export_onnx(checkpoint, out_file, weights=weights)
    diffs = ", ".join(f"batch {b}: {d:.1e}" for b, d in res.max_abs_diff.items())
    out.print(
        f"{res.path}: {res.classes} classes, {res.image_size} px; "
        f"max |onnxruntime - PyTorch| {diffs}",
        highlight=False,
    )


# ---------------------------------------------------------------------------- prediction
@app.command("batch-predict")
def batch_predict(
    checkpoint: Annotated[Path, typer.Option(help="Model directory from `lcm train`.")],
    db: Annotated[Path, typer.Option(help="DuckDB file (created if missing).")],
    run_id: Annotated[str, typer.Option(help="Names this run in the database.")],
    shards: Annotated[
        str | None, typer.Option(help="Shards: directory, glob, brace list or URL(s).")
    ] = None,
    images: Annotated[str | None, typer.Option(help="Directory or glob of JPEG/PNG files.")] = None,
    weights: Annotated[str, typer.Option(help="raw | ema.")] = "raw",
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    num_workers: Annotated[
        int | None, typer.Option(min=0, help="Decoding processes [default: 2 on CUDA, 0 on CPU].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
    parts: Annotated[
        Path | None, typer.Option(help="Parquet parts root (default: <db dir>/parts/<db name>).")
    ] = None,
    task_runner: Annotated[str, typer.Option(help="thread | dask.")] = "thread",
    dask_address: Annotated[
        str | None, typer.Option(help="Scheduler of an existing Dask cluster.")
    ] = None,
    replace: Annotated[bool, typer.Option(help="Recompute a run made with other inputs.")] = False,
    lock_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for another process's lock.")
    ] = 60.0,
    only_new: Annotated[
        bool,
        typer.Option(help="Images: score only those no earlier run of this model scored."),
    ] = False,
) -> None:
    """Score shards or image files into the prediction store (resumable; one row per image x
    label)."""
    from lcm.handoff import hand_over
    from lcm.predict import PredictRequest, check_request, check_run_conflict

    if task_runner not in ("thread", "dask"):
        raise typer.BadParameter("expected thread or dask", param_hint="--task-runner")
    request = PredictRequest(
        checkpoint=checkpoint,
        db=db,
        run_id=run_id,
        shards=shards,
        images=images,
        weights=weights,  # type: ignore[arg-type]  # checked by check_request
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        parts=parts,
        replace=replace,
        lock_timeout=lock_timeout,
        only_new=only_new,
    )
    meta, source = check_request(request)
    if check_run_conflict(request, meta, source) == "complete":
        out.print(f"run {run_id!r} is already complete in {db}: nothing to do", highlight=False)
        return
    from flows.predict import batch_predict

    _quiet_flow_errors()
    label = f"scoring {source.total} images in {_count(len(source.units), 'shard')}"
    with progress_bar(label) as update:
        run = batch_predict(
            task_runner,  # type: ignore[arg-type]  # checked above
            dask_address,
            progress=update,
            checked=hand_over((meta, source)),
            **request.flow_params(),
        )
    if run.get("already_complete"):
        out.print(f"run {run_id!r} is already complete in {db}: nothing to do", highlight=False)
        return
    skipped = run["n_skipped"]
    note = f"; skipped {skipped} images (table skipped_images)" if skipped else ""
    if run.get("n_reused"):
        note += f"; {run['n_reused']} scores reused from an earlier run (--only-new)"
    out.print(
        f"run {run_id!r}: {run['n_images']} images x {len(meta.classes)} labels in "
        f"{_count(run['n_shards'], 'shard')} -> {db}{note}",
        highlight=False,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


@app.command("query")
def query(
    sql: Annotated[str, typer.Argument(help="One SELECT or EXPLAIN statement.")],
    db: Annotated[Path | None, typer.Option(help="DuckDB file written by batch-predict.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json | parquet.")] = "table",
    out_file: Annotated[Path | None, typer.Option("--out", help="Write here, not stdout.")] = None,
    limit: Annotated[int | None, typer.Option(min=0, help="At most N rows.")] = None,
    parts: Annotated[
        Path | None, typer.Option(help="Query a data directory without its catalog.")
    ] = None,
    lock_timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait while a writer holds the catalog.")
    ] = 60.0,
) -> None:
    """Read-only SQL over the predictions (tables: runs, labels, run_shards, skipped_images,
    label_summaries; views: predictions, targets, predictions_named, scored, image_labels,
    label_drift). Never holds the catalog while the query runs."""
    from lcm.io import atomic_write_bytes
    from lcm.query import encode, run_query

    if fmt not in ("table", "csv", "json", "parquet"):
        raise typer.BadParameter("expected table, csv, json or parquet", param_hint="--format")
    shown = limit if limit is not None or fmt != "table" or out_file else TABLE_ROWS
    table, more = run_query(sql, db=db, parts=parts, limit=shown, lock_timeout=lock_timeout)
    if fmt == "table":
        if out_file:
            raise typer.BadParameter("--out needs --format csv, json or parquet")
        _print_table(table, more)
        return
    data = encode(table, fmt)  # type: ignore[arg-type]
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out_file, data)
        err.print(f"wrote {table.num_rows} rows to {out_file}", highlight=False)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


@store_app.command("migrate")
def store_migrate(
    db: Annotated[Path, typer.Option(help="A schema-1 DuckDB file of batch-predict.")],
    parts: Annotated[
        Path | None, typer.Option(help="Data root (default: <db dir>/parts/<db name>).")
    ] = None,
    lock_timeout: Annotated[float, typer.Option(min=0)] = 60.0,
) -> None:
    """Rewrite a schema-1 store (every row inside the DuckDB file) as schema 2: Parquet
    files per run and shard, the DuckDB file a catalog. The old file stays as <db>.v1."""
    from lcm.store_admin import migrate

    done = migrate(db, parts, lock_timeout)
    out.print(
        f"{db}: {done.runs} runs, {done.rows} rows migrated to schema 2 (files under "
        f"{done.data_root}); {done.bytes_before / 1e6:.1f} MB before, "
        f"{done.bytes_after / 1e6:.1f} MB after. The schema-1 file is kept as "
        f"{done.backup}: remove it when the new store serves you.",
        highlight=False,
    )


@store_app.command("prune")
def store_prune(
    db: Annotated[Path, typer.Option(help="Prediction store (DuckDB catalog).")],
    keep_days: Annotated[
        int | None, typer.Option(help="Keep runs whose run date is within N days.")
    ] = None,
    keep_runs: Annotated[int | None, typer.Option(help="Keep the N newest runs.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only say what would be removed.")] = False,
    lock_timeout: Annotated[float, typer.Option(min=0)] = 60.0,
) -> None:
    """Remove whole complete runs (catalog rows and files) and give their space back; runs
    being written are never touched. Safe to interrupt: a rerun finishes the job."""
    from lcm.store_admin import prune

    done = prune(db, keep_days=keep_days, keep_runs=keep_runs, dry_run=dry_run,
                 lock_timeout=lock_timeout)  # fmt: skip
    verb = "would remove" if dry_run else "removed"
    runs = ", ".join(done.runs) if done.runs else "no runs"
    orphans = f" and {_count(len(done.orphans), 'orphaned directory')}" if done.orphans else ""
    out.print(f"{db}: {verb} {runs}{orphans} ({done.bytes_freed / 1e6:.1f} MB)", highlight=False)


@store_app.command("compact")
def store_compact(
    db: Annotated[Path, typer.Option(help="Prediction store (DuckDB catalog).")],
    run_id: Annotated[str, typer.Option(help="A complete run.")],
    lock_timeout: Annotated[float, typer.Option(min=0)] = 60.0,
) -> None:
    """Rewrite a run's per-shard files into few large ones sorted by label and score (a
    label's rows in few row groups). Safe to interrupt."""
    from lcm.store_admin import compact

    done = compact(db, run_id, lock_timeout)
    out.print(
        f"run {run_id!r}: {done.files_before} files ({done.bytes_before / 1e6:.1f} MB) -> "
        f"{done.files_after} ({done.bytes_after / 1e6:.1f} MB)",
        highlight=False,
    )


TABLE_ROWS = 100  # rows a terminal table shows unless --limit says otherwise


def _print_table(table: Any, more: bool) -> None:
    from rich.table import Table

    view = Table(header_style="bold")
    for name in table.column_names:
        view.add_column(name, no_wrap=True)
    for row in table.to_pylist():
        view.add_row(*(_cell(v) for v in row.values()))
    # a pipe or file gets the whole width; a terminal crops rather than folds cells
    console = out if sys.stdout.isatty() else Console(width=100_000, soft_wrap=True)
    console.print(view)
    tail = " (more rows left out: use --limit N, or --format csv)" if more else ""
    rows = "1 row" if table.num_rows == 1 else f"{table.num_rows} rows"
    err.print(f"{rows}{tail}", highlight=False)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "NULL" if value is None else str(value)


@app.command("predict")
def predict(
    images: Annotated[list[Path], typer.Argument(help="JPEG or PNG files.")],
    checkpoint: Annotated[Path, typer.Option(help="Model directory from `lcm train`.")],
    top_k: Annotated[int, typer.Option(min=1)] = 5,
    weights: str = "raw",
    device: str = "auto",
) -> None:
    """A quick look: the top-k labels and scores of each image (as batch-predict scores them)."""
    from rich.table import Table

    from lcm.checkpoint import load_for_inference
    from lcm.predict import score_files
    from lcm.runtime import select_device

    dev = select_device(device)
    loaded = load_for_inference(checkpoint, weights, dev)
    keys, scores, skipped = score_files(images, loaded, dev)
    view = Table(header_style="bold")
    view.add_column("image", overflow="fold")
    for i in range(min(top_k, len(loaded.meta.classes))):
        view.add_column(f"#{i + 1}")
    for key, row in zip(keys, scores, strict=True):
        best = row.argsort()[::-1][:top_k]
        cells = []
        for c in best:
            mark = "*" if row[c] >= loaded.thresholds[c] else ""
            cells.append(f"{loaded.meta.classes[c]} {row[c]:.3f}{mark}")
        view.add_row(key, *cells)
    out.print(view)
    err.print(f"* at or above the label's threshold ({loaded.threshold_source})", highlight=False)
    for key, reason in skipped:
        err.print(f"skipped {key}: {reason}", highlight=False)
    if skipped:
        sys.exit(1)


@app.command("serve")
def serve(
    checkpoint: Annotated[Path, typer.Option(help="Model directory to predict with.")],
    db: Annotated[Path, typer.Option(help="Prediction store the scheduled runs write.")],
    shards: Annotated[
        str | None,
        typer.Option(help="Shards scored each night (directory, glob, brace list, URLs)."),
    ] = None,
    images: Annotated[
        str | None, typer.Option(help="Or an image folder scored each night.")
    ] = None,
    only_new: Annotated[
        bool, typer.Option(help="With --images: score only images no earlier run scored.")
    ] = False,
    cron: Annotated[str, typer.Option(help="When batch prediction runs.")] = "0 3 * * *",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron schedule.")] = "UTC",
    params_file: Annotated[Path, typer.Option("--params")] = Path("params.yaml"),
) -> None:
    """Serve deployments on the Prefect server in PREFECT_API_URL: lcm-batch-predict on the
    cron schedule (run id scheduled-<date>), lcm-train and lcm-evaluate on demand."""
    from flows.deploy import serve_deployments

    serve_deployments(
        checkpoint=checkpoint,
        shards=shards,
        db=db,
        cron=cron,
        timezone=timezone,
        params_file=params_file,
        on_ready=lambda names: err.print(
            f"serving {', '.join(names)} (Ctrl-C stops and pauses them)", highlight=False
        ),
        images=images,
        only_new=only_new,
    )


@app.command("alerts")
def alerts(
    url: Annotated[str, typer.Option(help="Incoming-webhook URL of your channel (or any URL).")],
    kind: Annotated[str, typer.Option(help="webhook | slack | teams.")] = "webhook",
) -> None:
    """Notify a channel when an lcm-* flow run ends Failed or Crashed: saves the notification
    block and creates the automations of prefect-automations.yaml on the server in
    PREFECT_API_URL (running it again replaces them)."""
    from flows.alerts import install_alerts

    if kind not in ("webhook", "slack", "teams"):
        raise typer.BadParameter("expected webhook, slack or teams", param_hint="--kind")
    names = install_alerts(url, kind)  # type: ignore[arg-type]  # checked above
    out.print(f"automations {', '.join(names)} notify {kind} {url}", highlight=False)


# ---------------------------------------------------------------------------- studies
def _numbers(text: str | None, option: str) -> tuple[float, ...] | None:
    from lcm.errors import ConfigError

    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers") from e
    if not values:
        raise ConfigError(f"{option} {text!r}: no values")
    return values


@app.command("ablate")
def ablate(
    study: Annotated[str, typer.Option(help="depth | mask-ratio | alpha | beta | partial")],
    grid: Annotated[str, typer.Option(help="quick (a 2-core CPU, < 1 h) | full (a GPU).")] = (
        "quick"
    ),
    seeds: Annotated[int | None, typer.Option(help="Seeds per point (quick 2, full 5).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    out_dir: Annotated[Path, typer.Option("--out", help="Results directory.")] = Path("studies"),
    profile: Annotated[
        str | None, typer.Option(help="Data and schedule: quick | full | b32 | tiny (the grid's).")
    ] = None,
    values: Annotated[
        str | None, typer.Option(help="Swept values instead of the grid's, e.g. 1,3.")
    ] = None,
    missing: Annotated[
        str | None, typer.Option(help="partial: missing ratios instead of the grid's.")
    ] = None,
    jobs: Annotated[
        int | None, typer.Option(help="Runs at once (CPU: one per core; GPU: 4).")
    ] = None,
    budget: Annotated[
        float | None, typer.Option(help="Seconds; no run starts after (rerun to continue).")
    ] = None,
) -> None:
    """One of the paper's studies on the synthetic benchmark: train every point of the grid
    (finished points are kept and skipped), then write OUT/results.csv, OUT/studies.duckdb
    and OUT/<study>/<profile>.png and .md (the trend fit beside the paper's finding)."""
    from flows.ablate import AblateRequest, ablate_flow

    request = AblateRequest(
        study=study,
        grid=grid,
        seeds=seeds,
        device=device,
        out=out_dir,
        profile=profile,
        values=_numbers(values, "--values"),
        missing=_numbers(missing, "--missing"),
        jobs=jobs,
        budget=budget,
    )
    request.check()  # before a Prefect server starts
    _quiet_flow_errors()
    result = ablate_flow(request)
    out.print(result["markdown"], highlight=False)
    out.print(
        f"{result['ran']} runs in {result['seconds']:.0f} s; results in {out_dir}/results.csv, "
        f"{out_dir}/studies.duckdb; figure and table in {out_dir}/{study}/",
        highlight=False,
    )


@visualize_app.command("attention")
def visualize_attention(
    checkpoint: Annotated[Path, typer.Option(help="LCM model directory.")],
    image: Annotated[Path, typer.Option(help="JPEG or PNG file.")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    labels: Annotated[
        str | None, typer.Option(help="Comma-separated labels (the predicted ones).")
    ] = None,
    top: Annotated[int, typer.Option(help="At most this many predicted labels.")] = 4,
    baseline: Annotated[
        Path | None, typer.Option(help="A gap model directory: adds its class activation maps.")
    ] = None,
    weights: Annotated[str, typer.Option(help="raw | ema")] = "raw",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """Per label: the class-aware attention (the plain backbone's view), the map reached
    through the latent context tokens, and LCM's combination of the two (paper Fig. 3)."""
    from lcm.runtime import select_device
    from lcm.visualize import attention_figure

    names = [n.strip() for n in labels.split(",") if n.strip()] if labels else None
    shown = attention_figure(checkpoint, image, out_file, labels=names, top=top,
                             weights=weights, baseline=baseline,
                             device=select_device(device))  # fmt: skip
    rows = ", ".join(f"{name} {score:.2f} (overlap {o:.2f})" for name, score, o in shown)
    out.print(f"wrote {out_file}: {rows}", highlight=False)


@visualize_app.command("reach")
def visualize_reach(
    checkpoint: Annotated[Path, typer.Option(help="LCM model directory.")],
    raw: Annotated[Path, typer.Option(help="Root of an interaction-tier `lcm data synth` set.")],
    split: Annotated[str, typer.Option(help="train | val")] = "val",
    max_images: Annotated[int, typer.Option(help="Images read, in file order.")] = 500,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Also write the table (Markdown) here.")
    ] = None,
    weights: Annotated[str, typer.Option(help="raw | ema")] = "raw",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """Per label: the share of its class-aware and of its context map's mass on anchor glyphs
    (the paper's Fig. 3 claim that context maps reach the context, measured)."""
    from lcm.io import atomic_write_text
    from lcm.reach import anchor_reach, reach_table
    from lcm.runtime import select_device

    with progress_bar("images") as bar:
        got = anchor_reach(checkpoint, raw, split, weights=weights, max_images=max_images,
                           device=select_device(device), progress=bar)  # fmt: skip
    table = reach_table(got)
    out.print(table, highlight=False)
    if out_file is not None:
        atomic_write_text(out_file, table)
        out.print(f"wrote {out_file}", highlight=False)


@visualize_app.command("tsne")
def visualize_tsne(
    checkpoint: Annotated[Path, typer.Option(help="LCM model directory.")],
    shards: Annotated[str, typer.Option(help="Shards: directory, glob, brace list or URL(s).")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG to write.")],
    max_images: Annotated[int, typer.Option(help="Images read from the shards.")] = 300,
    seed: Annotated[int, typer.Option(help="t-SNE seed.")] = 0,
    weights: Annotated[str, typer.Option(help="raw | ema")] = "raw",
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "cpu",
) -> None:
    """t-SNE of the class-aware, context-aware and fusion features of every positive label,
    coloured by label, with each kind's label silhouette and 5-NN accuracy (paper Fig. 4)."""
    from lcm.runtime import select_device
    from lcm.visualize import tsne_figure

    with progress_bar("features") as bar:
        got = tsne_figure(checkpoint, shards, out_file, max_images=max_images, seed=seed,
                          weights=weights, device=select_device(device),
                          progress=bar)  # fmt: skip
    out.print(f"wrote {out_file}", highlight=False)
    for kind, sil in got["silhouette"].items():
        out.print(f"  {kind}: label silhouette {sil:+.2f}, 5-NN label accuracy "
                  f"{got['knn'][kind]:.2f}", highlight=False)  # fmt: skip


@app.command("summary")
def summary(
    metrics_file: Annotated[Path, typer.Argument()] = Path("metrics/eval/metrics.json"),
) -> None:
    """Print the headline result of the demo pipeline."""
    from lcm.errors import DataError

    if not metrics_file.is_file():
        raise DataError(f"{metrics_file}: not found; run `dvc repro` first")
    m = json.loads(metrics_file.read_text())
    out.print(f"val mAP {100 * m['mAP']:.2f} on {m['n_images']} images ({metrics_file})")


if __name__ == "__main__":
    app()
