"""The training state and one optimisation step: the seam every trainer goes through.

:func:`build_trainer` makes the model, its EMA, the optimiser, the LR schedule and the loss
scaler from the model / loss / train configs; :func:`train_step` runs one step on a batch.
``engine.fit``, the benchmarks and the GPU check all train through these two, so a speed-up
or a fix lands everywhere at once.

The speed-ups are train-config switches, each measured in the README's GPU table and none
changing results beyond float tolerance:

- ``ema_foreach``: the EMA update as two multi-tensor kernels (lerp of the float tensors,
  copy of the integer buffers) instead of one small kernel per tensor;
- ``fused_optimizer``: AdamW / SGD with ``fused=True`` (one kernel for the whole update);
- ``cudnn_benchmark``: cuDNN picks the fastest convolution algorithm per shape (CUDA only);
- ``compile``: ``torch.compile`` of the network (pays its compile time once per run).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from lcm.config import LossConfig, ModelConfig, TrainConfig
from lcm.errors import ConfigError
from lcm.models import build_model
from lcm.models.losses import compute_loss
from lcm.runtime import Dist, amp_dtype, autocast, unwrap


class _HasImagesTargets(Protocol):
    images: Tensor
    targets: Tensor


# ---------------------------------------------------------------------------------------- EMA
class Ema:
    """Exponential moving average of a model's weights (integer buffers are copied).

    ``foreach=True`` updates all tensors with two multi-tensor kernels; ``False`` loops over
    them one by one (the reference the foreach path is tested against: same values).
    """

    def __init__(self, model: nn.Module, decay: float, foreach: bool = True) -> None:
        self.decay, self.foreach = decay, foreach
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)
        self.updates = 0
        self._names = list(self.module.state_dict())
        self._src: tuple[tuple[int, ...], list[Tensor], list[Tensor]] | None = None
        self._dst: tuple[tuple[int, ...], list[Tensor], list[Tensor]] | None = None

    def _split(self, state: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        floats = [state[n] for n in self._names if state[n].dtype.is_floating_point]
        others = [state[n] for n in self._names if not state[n].dtype.is_floating_point]
        return floats, others

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        # Warm-up: early averages would otherwise be dominated by the random init.
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src_model = unwrap(model)
        if not self.foreach:
            src = src_model.state_dict()
            for name, value in self.module.state_dict().items():
                if value.dtype.is_floating_point:
                    value.lerp_(src[name].detach(), 1.0 - d)
                else:
                    value.copy_(src[name])
            return
        # state_dict() values alias the live tensors, so the lists are rebuilt only when a
        # tensor moved (model.to(...), a new model): the storage addresses are the check
        self._src = self._aliases(src_model, self._src)
        self._dst = self._aliases(self.module, self._dst)
        _, src_f, src_o = self._src
        _, dst_f, dst_o = self._dst
        if dst_f:
            torch._foreach_lerp_(dst_f, src_f, 1.0 - d)
        if dst_o:
            torch._foreach_copy_(dst_o, src_o)

    def _aliases(
        self, module: nn.Module, cached: tuple[tuple[int, ...], list[Tensor], list[Tensor]] | None
    ) -> tuple[tuple[int, ...], list[Tensor], list[Tensor]]:
        where = (id(module), *(t.data_ptr() for t in module.parameters()))
        where += tuple(t.data_ptr() for t in module.buffers())
        if cached is not None and cached[0] == where:
            return cached
        return (where, *self._split(module.state_dict()))

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])  # in place: cached aliases stay valid
        self.updates = int(state["updates"])


# ------------------------------------------------------------------------ optimiser, schedule
def _adamw(groups: list[dict[str, Any]], cfg: TrainConfig, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, **kw)


def _sgd(groups: list[dict[str, Any]], cfg: TrainConfig, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True, **kw)


# train.optimizer -> factory(param groups, train config, fused=...)
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adamw": _adamw, "sgd": _sgd}


def init_output_bias(model: nn.Module, priors: Sequence[float]) -> None:
    """Every output bias of ``model`` (its ``output_biases()``) set to the classes' log-odds,
    so training starts from the label frequencies instead of 0.5 for every class."""
    p = torch.as_tensor(list(priors), dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        for bias in model.output_biases():
            bias.copy_(torch.log(p / (1 - p)))


def _onecycle(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    if not 0.0 < cfg.warmup < 1.0:
        raise ConfigError(f"train.warmup must lie in (0, 1), got {cfg.warmup}")
    peaks = [g.get("lr", cfg.lr) for g in opt.param_groups]  # per group: head_lr, lr
    return torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=peaks, total_steps=steps, pct_start=cfg.warmup
    )


def _cosine(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


def _constant(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, _one)


def _one(_step: int) -> float:
    return 1.0


# train.scheduler -> factory(optimizer, train config, total steps); stepped once per step
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, TrainConfig, int], LRScheduler]] = {
    "onecycle": _onecycle,
    "cosine": _cosine,
    "constant": _constant,
}


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device | None = None
) -> torch.optim.Optimizer:
    """``train.optimizer`` over two parameter groups: no weight decay on biases, norms and
    embeddings (standard for Transformers)."""
    if cfg.head_lr is None:
        groups = _decay_groups(model.named_parameters(), cfg)
    else:  # the backbone at train.lr, everything else at train.head_lr
        named = list(unwrap(model).named_parameters())
        backbone = [(n, p) for n, p in named if n.startswith("backbone.")]
        head = [(n, p) for n, p in named if not n.startswith("backbone.")]
        groups = [
            *(g | {"lr": cfg.lr} for g in _decay_groups(backbone, cfg)),
            *(g | {"lr": cfg.head_lr} for g in _decay_groups(head, cfg)),
        ]
    fused = cfg.fused_optimizer and (device is None or device.type in ("cuda", "cpu"))
    # leaving fused out lets PyTorch pick its default (foreach on CUDA)
    return OPTIMIZERS[cfg.optimizer](groups, cfg, **({"fused": True} if fused else {}))


def _decay_groups(named: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "embed" in name else decay).append(p)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int) -> LRScheduler:
    return SCHEDULERS[cfg.scheduler](opt, cfg, max(1, total_steps))


# ------------------------------------------------------------------------------------- state
@dataclass
class TrainState:
    """Everything one optimisation step reads and writes.

    ``model`` is the bare model (its weights are what is saved); ``net`` is what is called,
    the model itself or a DDP / compiled wrapper of it.
    """

    model: nn.Module
    net: nn.Module
    ema: Ema | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loss: LossConfig
    train: TrainConfig
    device: torch.device
    dtype: torch.dtype | None

    @property
    def channels_last(self) -> bool:
        return self.train.channels_last and self.device.type == "cuda"

    def state_dict(self) -> dict[str, Any]:
        """The trainable state (weights, optimiser, schedule, scaler, EMA) for a checkpoint."""
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model"])
        # the saved param groups carry fused / foreach; this run's train config decides them
        kernels = {k: self.opt.param_groups[0][k] for k in ("fused", "foreach")}
        saved = len(state["optimizer"]["param_groups"])
        if saved != len(self.opt.param_groups):
            raise ConfigError(
                f"the checkpoint's optimiser has {saved} parameter groups, this run "
                f"{len(self.opt.param_groups)}: train.head_lr was switched since; resume with "
                "the checkpoint's setting"
            )
        self.opt.load_state_dict(state["optimizer"])
        for group in self.opt.param_groups:
            group.update(kernels)
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])


def build_trainer(
    model_cfg: ModelConfig,
    loss_cfg: LossConfig,
    train_cfg: TrainConfig,
    num_classes: int,
    total_steps: int,
    device: torch.device,
    dist: Dist | None = None,
    priors: Sequence[float] | None = None,
) -> TrainState:
    """Model (branch on when ``loss.beta > 0``), EMA, optimiser, schedule and scaler, on
    ``device``; wrapped in DDP for several ranks and compiled when ``train.compile``.
    The caller seeds the RNGs first (the initial weights draw from the global RNG).
    ``priors``: each class's share of positive training targets; with ``model.prior_bias``
    the output biases start at their log-odds (needed then)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = train_cfg.cudnn_benchmark
    dtype = amp_dtype(train_cfg.amp, device)
    model = build_model(model_cfg, num_classes, branch=loss_cfg.beta > 0)
    if model_cfg.prior_bias:
        if priors is None:
            raise ConfigError("model.prior_bias needs the training set's class priors")
        init_output_bias(model, priors)
    model = model.to(device)
    if train_cfg.channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    ema = Ema(model, train_cfg.ema_decay, train_cfg.ema_foreach) if train_cfg.ema_decay else None
    opt = build_optimizer(model, train_cfg, device)
    sched = build_scheduler(opt, train_cfg, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net: nn.Module = model
    if dist is not None and dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model,
            # the aux head gets no gradient with alpha 0, the context prototypes none
            # without context tokens
            find_unused_parameters=loss_cfg.alpha == 0 or not model_cfg.context_tokens,
        )
    if train_cfg.compile:
        net = torch.compile(net)
    return TrainState(model, net, ema, opt, sched, scaler, loss_cfg, train_cfg, device, dtype)


def train_step(state: TrainState, batch: _HasImagesTargets) -> Tensor:
    """One optimisation step on ``batch`` (images, targets; on any device). Returns the
    detached loss on the device (reading it would synchronise a GPU every step)."""
    s, cfg = state, state.train
    images = batch.images.to(s.device, non_blocking=True)
    targets = batch.targets.to(s.device, non_blocking=True)
    if s.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(s.device, s.dtype):
        out = s.net(images, targets)
    loss, _parts = compute_loss(out, targets, s.loss)
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    if cfg.grad_clip:
        s.scaler.unscale_(s.opt)
        nn.utils.clip_grad_norm_(s.model.parameters(), cfg.grad_clip)
    s.scaler.step(s.opt)
    s.scaler.update()
    s.sched.step()
    if s.ema is not None:
        s.ema.update(s.model)
    return loss.detach()


@dataclass(frozen=True)
class TensorBatch:
    """A batch of tensors already at hand (benchmarks; tests)."""

    images: Tensor
    targets: Tensor
