"""Training and evaluation loops with exact resume.

``fit`` trains one model from the train shard stream, evaluates the raw and the EMA weights
separately after every epoch, and checkpoints so that a run killed at any point resumes to
the same result: the data order is a function of (seed, epoch), every RNG state is saved with
the optimizer, and mid-epoch checkpoints record how many batches of the epoch are done.
Logging and progress reach the caller through callbacks (the library knows no Prefect/DVC).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcm import checkpoint as ckpt
from lcm.config import Params, to_dict
from lcm.data.shards import eval_loader, resolve_shards, train_loader
from lcm.data.transforms import MEAN, STD
from lcm.errors import ConfigError
from lcm.inference import predict
from lcm.io import atomic_write_json
from lcm.metrics import evaluate_scores
from lcm.models import build_model
from lcm.models.losses import compute_loss
from lcm.progress import ProgressCallback
from lcm.runtime import Dist, amp_dtype, autocast, seed_everything, select_device

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


# ---------------------------------------------------------------------------------------- EMA
class Ema:
    """Exponential moving average of a model's weights (buffers are copied)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Warm-up: early averages would otherwise be dominated by the random init.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = unwrap(model).state_dict()
        for name, value in self.module.state_dict().items():
            if value.dtype.is_floating_point:
                value.lerp_(src[name].detach(), 1.0 - d)
            else:
                value.copy_(src[name])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "module", model)  # DistributedDataParallel
    return getattr(model, "_orig_mod", model)  # torch.compile


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


def build_optimizer(model: nn.Module, params: Params) -> torch.optim.Optimizer:
    cfg = params.train
    # No weight decay on biases, norms and embeddings (standard practice for Transformers).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "embed" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_scheduler(
    opt: torch.optim.Optimizer, params: Params, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    cfg = params.train
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=total_steps, pct_start=0.2
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def fit(
    params: Params,
    train_shards: str | Path,
    val_shards: str | Path | None,
    out_dir: Path,
    *,
    mask: Path | None = None,
    resume: bool = False,
    on_epoch: EpochCallback | None = None,
    progress: ProgressCallback | None = None,
    dist: Dist | None = None,
    record_keys: bool = False,
) -> FitResult:
    """Train ``params.model`` on the shards; checkpoint into ``out_dir``; return the history."""
    cfg = params.train
    dist = dist or Dist()
    device = select_device(cfg.device)
    dtype = amp_dtype(cfg.amp, device)
    out_dir = Path(out_dir)

    shard_paths, info = resolve_shards(train_shards)
    classes = tuple(info.classes)
    val = None
    if val_shards is not None:
        val = val_paths, val_info = resolve_shards(val_shards)
        if tuple(val_info.classes) != classes:
            raise ConfigError(
                f"{val_shards}: the validation shards have other classes than {train_shards}"
            )
    if resume:
        ckpt.check_compatible(out_dir, params.model, classes)

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
        )

    steps_per_epoch = len(make_train(0, 0))
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{train_shards}: {info.total} samples give no full batch of {cfg.batch_size} "
            f"per rank ({dist.world_size} ranks); lower train.batch_size"
        )
    total_steps = steps_per_epoch * cfg.epochs

    seed_everything(cfg.seed)
    model = build_model(params.model, len(classes), branch=params.loss.beta > 0).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay else None
    opt = build_optimizer(model, params)
    sched = build_scheduler(opt, params, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start_epoch, start_batch, step, history = 0, 0, 0, []
    running, n_loss = 0.0, 0  # this epoch's loss sum, carried through mid-epoch resumes
    if resume:
        state = ckpt.load_state(out_dir)
        unwrap(model).load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        start_epoch, start_batch, step = state["epoch"], state["batch"], state["step"]
        running, n_loss = float(state["loss_sum"]), int(state["loss_count"])
        history = [dict(zip(state["history_keys"], row, strict=True)) for row in state["history"]]
        ckpt.set_rng_state(state["rng"])
        log.info("resuming at epoch %d, batch %d (step %d)", start_epoch, start_batch, step)

    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            find_unused_parameters=params.loss.alpha == 0,  # aux head then gets no gradient
        )
    if cfg.compile:
        net = torch.compile(net)

    meta = ckpt.ModelMeta(
        model=params.model,
        classes=classes,
        image_size=cfg.image_size,
        mean=MEAN,
        std=STD,
        extra={"params": to_dict(params), "weights": "raw"},
    )

    def save(epoch: int, batch: int, loss_sum: float = 0.0, loss_count: int = 0) -> None:
        if not dist.main:
            return
        ckpt.save_model(out_dir, model, meta, ema.module if ema else None)
        keys = sorted({k for row in history for k in row})
        ckpt.save_state(
            out_dir,
            {
                "model": unwrap(model).state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "ema": ema.state_dict() if ema else None,
                "epoch": epoch,
                "batch": batch,
                "step": step,
                "rng": ckpt.rng_state(),
                "history_keys": keys,
                "loss_sum": loss_sum,
                "loss_count": loss_count,
                "history": [[float(row.get(k, math.nan)) for k in keys] for row in history],
            },
        )

    for epoch in range(start_epoch, cfg.epochs):
        net.train()
        seen: list[str] = []
        for i, batch in enumerate(_iterate(make_train(epoch, start_batch)), start=start_batch):
            loss = train_step(
                net,
                model,
                batch.images,
                batch.targets,
                opt,
                sched,
                scaler,
                ema,
                params,
                device,
                dtype,
            )
            step += 1
            running = running + loss.float()
            n_loss += 1
            if record_keys:
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
        if record_keys:
            (out_dir / "ranks").mkdir(parents=True, exist_ok=True)
            (out_dir / "ranks" / f"epoch{epoch}-rank{dist.rank}.txt").write_text("\n".join(seen))

        row: dict[str, float] = {"epoch": epoch + 1, "step": step, "lr": sched.get_last_lr()[0]}
        if n_loss:
            row["train_loss"] = float(running) / n_loss
        running, n_loss = 0.0, 0
        if val is not None and dist.main:
            row.update(_validate(model, ema, val, classes, params, device, dtype))
        history.append(row)
        if dist.main:
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
            if on_epoch:
                on_epoch(epoch, row)
        save(epoch + 1, 0)
        if dist.main:
            atomic_write_json(out_dir / "history.json", history)
        if dist.world_size > 1:
            torch.distributed.barrier()
    return FitResult(out_dir=out_dir, epochs=cfg.epochs, steps=step, history=history)


def train_step(
    net: nn.Module,
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    ema: Ema | None,
    params: Params,
    device: torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    """One optimisation step; ``net`` may wrap ``model`` (DDP, compile). Returns the detached
    loss on the device (reading it would synchronise a GPU every step)."""
    cfg = params.train
    images = images.to(device, non_blocking=True)
    targets = targets.to(device, non_blocking=True)
    if cfg.channels_last and device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, dtype):
        out = net(images, targets)
    loss, _parts = compute_loss(out, targets, params.loss)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss.detach()


def step_time(params: Params, steps: int, device: torch.device, num_classes: int) -> float:
    """Median seconds of a training step on random tensors already on the device: the cost of
    the model alone, for equal-compute comparisons and the data-pipeline benchmark."""
    import time

    cfg = params.train
    torch.manual_seed(0)
    model = build_model(params.model, num_classes, branch=params.loss.beta > 0).to(device)
    if cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = build_optimizer(model, params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    dtype = amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = Ema(model, cfg.ema_decay) if cfg.ema_decay else None
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    targets = (torch.rand(cfg.batch_size, num_classes, device=device) < 0.2).float()
    times = []
    for i in range(steps + 2):  # two warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        train_step(model, model, images, targets, opt, sched, scaler, ema, params, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _iterate(loader: Any) -> Iterator[Any]:
    """Iterate a loader without letting it touch the global RNG.

    A DataLoader draws its worker base seed from the global RNG when it starts, which would
    shift dropout and label-mask draws after a mid-epoch resume; the data order and flips have
    their own seeded generators, so the training RNG stays the model's alone.
    """
    it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def _validate(
    model: nn.Module,
    ema: Ema | None,
    val: tuple[list[Path], Any],
    classes: tuple[str, ...],
    params: Params,
    device: torch.device,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    loader = eval_loader(
        val,
        batch_size=params.evaluate.batch_size,
        image_size=params.train.image_size,
        num_workers=params.train.num_workers,
    )
    row: dict[str, float] = {}
    candidates: list[tuple[str, nn.Module]] = [("val", unwrap(model))]
    if ema is not None:
        candidates.append(("val_ema", ema.module))
    for prefix, m in candidates:
        _, scores, targets = predict(m, loader, device, dtype)
        res = evaluate_scores(scores, targets, classes)
        row[f"{prefix}_mAP"] = res.mAP
        row[f"{prefix}_OF1"] = res.at_threshold.OF1
        row[f"{prefix}_CF1"] = res.at_threshold.CF1
    return row
