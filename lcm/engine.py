"""Training and evaluation loops with exact resume.

``fit`` trains one model from the train shard stream, evaluates the raw and the EMA weights
separately after every epoch, and checkpoints so that a run killed at any point resumes to
the same result: the data order is a function of (seed, epoch), every RNG state is saved with
the optimizer, and mid-epoch checkpoints record how many batches of the epoch are done.
Logging and progress reach the caller through callbacks (the library knows no Prefect/DVC).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lcm import checkpoint as ckpt
from lcm.config import Params, TrainConfig, to_dict
from lcm.data.shards import eval_loader, label_priors, train_loader
from lcm.data.transforms import MEAN, STD
from lcm.errors import ConfigError
from lcm.inference import predict
from lcm.io import atomic_write_json
from lcm.metrics import evaluate_scores
from lcm.progress import ProgressCallback
from lcm.resume import ResumeState
from lcm.runtime import Dist, seed_everything, select_device, unwrap
from lcm.train_request import ResolvedTrain, TrainRequest, check_request
from lcm.trainer import TrainState, build_trainer, train_step

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------- fit
@dataclass
class FitResult:
    out_dir: Path
    epochs: int
    steps: int
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def fit(
    request: TrainRequest | ResolvedTrain,
    *,
    on_epoch: EpochCallback | None = None,
    progress: ProgressCallback | None = None,
    dist: Dist | None = None,
) -> FitResult:
    """Train ``req.params.model`` on ``req.train_shards``; checkpoint into ``req.out_dir``;
    return the history. A plain request is checked and resolved first
    (:func:`lcm.train_request.check_request`); a resolved one is used as it is."""
    resolved = check_request(request)
    req = resolved.request
    params, cfg, mask = req.params, req.params.train, req.mask
    dist = dist or Dist()
    device = select_device(cfg.device)
    out_dir = Path(req.out_dir)

    shard_paths, info = resolved.train
    classes = tuple(info.classes)
    val = resolved.val

    def make_train(epoch: int, skip: int) -> Any:
        return train_loader(
            (shard_paths, info),
            batch_size=cfg.batch_size,
            image_size=cfg.image_size,
            seed=cfg.seed,
            epoch=epoch,
            num_workers=cfg.num_workers,
            rank=dist.rank,
            world_size=dist.world_size,
            mask=mask,
            skip_batches=skip,
            **batch_delivery(cfg, device),
        )

    steps_per_epoch = len(make_train(0, 0))
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{req.train_shards}: {info.total} samples give no full batch of {cfg.batch_size} "
            f"per rank ({dist.world_size} ranks); lower train.batch_size"
        )
    total_steps = steps_per_epoch * cfg.epochs

    seed_everything(cfg.seed)
    priors = label_priors((shard_paths, info), mask) if params.model.prior_bias else None
    state = build_trainer(
        params.model, params.loss, cfg, len(classes), total_steps, device, dist=dist,
        priors=priors,
    )  # fmt: skip
    model, ema = state.model, state.ema

    start_epoch, start_batch, step, history = 0, 0, 0, []
    running, n_loss = 0.0, 0  # this epoch's loss sum, carried through mid-epoch resumes
    if req.resume:
        saved = ResumeState.load(out_dir)
        saved.restore(state)
        start_epoch, start_batch, step = saved.epoch, saved.batch, saved.step
        running, n_loss, history = saved.loss_sum, saved.loss_count, saved.history
        log.info("resuming at epoch %d, batch %d (step %d)", start_epoch, start_batch, step)

    meta = ckpt.ModelMeta(
        model=params.model,
        classes=classes,
        image_size=cfg.image_size,
        mean=MEAN,
        std=STD,
        extra={"params": to_dict(params), "weights": "raw"},
    )
    writer = ckpt.CheckpointWriter(background=cfg.checkpoint_async)

    def save(epoch: int, batch: int, loss_sum: float = 0.0, loss_count: int = 0) -> None:
        """Snapshot now; write now or in the background (``train.checkpoint_async``)."""
        if not dist.main:
            return
        writer.wait()  # one snapshot in host memory at a time
        raw = ckpt.plain_state(model)
        ema_w = ckpt.plain_state(ema.module) if ema else None
        snapshot = ResumeState.capture(
            state,
            epoch=epoch,
            batch=batch,
            step=step,
            loss_sum=loss_sum,
            loss_count=loss_count,
            history=history,
        )
        if cfg.checkpoint_async:
            snapshot = snapshot.to_cpu()
        rows = [dict(row) for row in history] if batch == 0 else None

        def write() -> None:
            ckpt.save_weights(out_dir, raw, meta, ema_w)
            snapshot.save(out_dir)
            if rows is not None:  # end of an epoch
                atomic_write_json(out_dir / "history.json", rows)

        writer.submit(write)

    try:
        for epoch in range(start_epoch, cfg.epochs):
            state.net.train()
            seen: list[str] = []
            # closing: an error stops the loader (its workers, prefetch thread) right away
            with contextlib.closing(_iterate(make_train(epoch, start_batch))) as batches:
                for i, batch in enumerate(batches, start=start_batch):
                    loss = train_step(state, batch)
                    step += 1
                    running = running + loss.float()
                    n_loss += 1
                    if req.record_keys:
                        seen.extend(batch.keys)
                    if progress and dist.main:
                        progress(step, total_steps)
                    done_in_epoch = i + 1
                    if (
                        cfg.checkpoint_every
                        and step % cfg.checkpoint_every == 0
                        and done_in_epoch < steps_per_epoch
                    ):
                        save(epoch, done_in_epoch, float(running), n_loss)
            start_batch = 0
            if req.record_keys:
                ranks = out_dir / "ranks"
                ranks.mkdir(parents=True, exist_ok=True)
                (ranks / f"epoch{epoch}-rank{dist.rank}.txt").write_text("\n".join(seen))

            row: dict[str, float] = {
                "epoch": epoch + 1,
                "step": step,
                "lr": state.sched.get_last_lr()[0],
            }
            if n_loss:
                row["train_loss"] = float(running) / n_loss
            running, n_loss = 0.0, 0
            if val is not None and dist.main:
                row.update(_validate(state, val, classes, params))
            history.append(row)
            if dist.main:
                log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
                if on_epoch:
                    on_epoch(epoch, row)
            save(epoch + 1, 0)
            if dist.world_size > 1:
                torch.distributed.barrier()
    except BaseException:
        writer.close(quiet=True)  # the training error is the one to report
        raise
    writer.close()
    return FitResult(out_dir=out_dir, epochs=cfg.epochs, steps=step, history=history)


def _iterate(loader: Any) -> Iterator[Any]:
    """Iterate a loader without letting it touch the global RNG.

    A DataLoader draws its worker base seed from the global RNG when it starts, which would
    shift dropout and label-mask draws after a mid-epoch resume; the data order and flips have
    their own seeded generators, so the training RNG stays the model's alone.
    """
    it = iter(loader)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                return
            yield batch
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def batch_delivery(cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Loader arguments that put batches on the training device (pinned copies, GPU decode)."""
    if device.type != "cuda":
        return {}
    return {"device": device, "pin_memory": cfg.pin_memory, "decode_on_device": cfg.gpu_decode}


def _validate(
    state: TrainState,
    val: tuple[list[Path], Any],
    classes: tuple[str, ...],
    params: Params,
) -> dict[str, float]:
    loader = eval_loader(
        val,
        batch_size=params.evaluate.batch_size,
        image_size=params.train.image_size,
        num_workers=params.train.num_workers,
        # scored with the CPU decoder, like `lcm evaluate`, whatever train.gpu_decode says
        **batch_delivery(replace(params.train, gpu_decode=False), state.device),
    )
    row: dict[str, float] = {}
    candidates: list[tuple[str, nn.Module]] = [("val", unwrap(state.model))]
    if state.ema is not None:
        candidates.append(("val_ema", state.ema.module))
    for prefix, m in candidates:
        _, scores, targets = predict(m, loader, state.device, state.dtype)
        res = evaluate_scores(scores, targets, classes)
        row[f"{prefix}_mAP"] = res.mAP
        row[f"{prefix}_OF1"] = res.at_threshold.OF1
        row[f"{prefix}_CF1"] = res.at_threshold.CF1
    return row
