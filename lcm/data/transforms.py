"""Image decoding and the train/eval presets (one place, so model.json can record them).

Images arrive as JPEG bytes from the shards. Both presets resize straight to a square
``size x size`` (no crop: in multi-label recognition a crop can remove the very objects an
image is labelled with), then normalise with the ImageNet statistics. Training adds only a
random horizontal flip, for the same reason. The flip draws from an explicit
``torch.Generator`` so a data loader can make it a pure function of (seed, epoch, batch) and
resume mid-epoch exactly.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.nn.functional import interpolate

from lcm.errors import ConfigError
from lcm.vision import torchvision

ImageReadMode = torchvision.io.ImageReadMode
decode_jpeg = torchvision.io.decode_jpeg
_decode_any = torchvision.io.decode_image

# ImageNet channel statistics, the convention of the torchvision backbones.
MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def decode_image(data: bytes) -> Tensor:
    """JPEG bytes -> uint8 ``(3, H, W)`` RGB; grayscale and CMYK are converted.

    Raises ``RuntimeError`` (torchvision's) on data that is not a complete JPEG; the caller
    knows which file it came from and turns it into a ``DataError``.
    """
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # bytearray: writable, no warning
    return decode_jpeg(raw, mode=ImageReadMode.RGB)


def decode_image_file(data: bytes) -> Tensor:
    """JPEG or PNG bytes -> uint8 ``(3, H, W)`` RGB (alpha dropped, grayscale expanded).

    Raises ``RuntimeError`` on anything torchvision cannot decode.
    """
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return _decode_any(raw, mode=ImageReadMode.RGB)


def resize_square(img: Tensor, size: int) -> Tensor:
    """uint8 ``(..., 3, H, W)`` -> uint8 ``(..., 3, size, size)``, bilinear with antialiasing.

    The steps of ``torchvision.transforms.v2.functional.resize`` for a tensor, bit for bit
    (tests/test_transforms.py holds them equal): importing that module loads TorchDynamo, ~2 s
    in every process that decodes an image. uint8 is interpolated as it is on x86 CPUs with
    AVX2 and on ARM (torch's native uint8 kernel), through float32 and rounding elsewhere
    (GPUs included).
    """
    shape, dtype = img.shape, img.dtype
    channels, height, width = shape[-3:]
    if (height, width) == (size, size):
        return img
    x = img.reshape(-1, channels, height, width)
    strides = list(x.stride())
    if (
        x.is_contiguous(memory_format=torch.channels_last)
        and x.shape[0] == 1
        and (x.numel() != strides[0])
    ):  # keep a single channels-last image channels-last (torch allocates the output by
        # the ambiguous 1CHW strides otherwise, and repacks it)
        strides[0] = x.numel()
        x = x.as_strided((1, channels, height, width), strides)
    native = dtype in (torch.float32, torch.float64) or (
        dtype == torch.uint8 and x.device.type == "cpu" and _native_uint8_bilinear()
    )
    y = interpolate(x if native else x.to(torch.float32), size=[size, size], mode="bilinear",
                    align_corners=False, antialias=True)  # fmt: skip
    if not native:
        y = (y.round_() if not dtype.is_floating_point else y).to(dtype)
    return y.reshape(shape[:-3] + (channels, size, size))


@functools.cache
def _native_uint8_bilinear() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or (
        platform.machine() in ("aarch64", "arm64")
    )


def normalize(
    img: Tensor,
    out: Tensor | None = None,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> Tensor:
    """uint8 ``(..., 3, H, W)`` -> float32 ``(x / 255 - mean) / std``, optionally into ``out``.

    Cheapest on a whole batch: the broadcast arithmetic has a per-call cost that dominates on
    single small images. ``mean`` / ``std`` come from the model's ``model.json`` at prediction
    time, so a checkpoint is always fed the statistics it was trained with.
    """
    mean_255, inv_std_255 = _stats(tuple(mean), tuple(std), str(img.device))
    x = img.to(torch.float32) if out is None else out.copy_(img)
    return x.sub_(mean_255).mul_(inv_std_255)


@functools.lru_cache(maxsize=8)
def _stats(
    mean: tuple[float, ...], std: tuple[float, ...], device: str = "cpu"
) -> tuple[Tensor, Tensor]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"normalisation needs 3 means and 3 positive stds, got {mean}, {std}")
    mean_255 = torch.tensor(mean).view(3, 1, 1) * 255.0  # (3, 1, 1), on the 0..255 scale
    inv_std_255 = 1.0 / (torch.tensor(std).view(3, 1, 1) * 255.0)
    return mean_255.to(device), inv_std_255.to(device)


def decode_images(data: Sequence[bytes], device: torch.device) -> list[Tensor]:
    """JPEG bytes -> uint8 ``(3, H, W)`` RGB images on ``device``, decoded there: on a GPU one
    batched nvJPEG call, on the CPU the same decoder as :func:`decode_image`.

    Raises ``RuntimeError`` if any image cannot be decoded; the caller locates it.
    """
    raws = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    if not raws:
        return []
    return list(decode_jpeg(raws, mode=ImageReadMode.RGB, device=device))


class Preset:
    """uint8 ``(3, H, W)`` -> float32 ``(3, size, size)``: square resize, optional flip,
    normalisation. :meth:`pixels` is the uint8 part, so a loader can resize images one by one
    and normalise the whole batch in one go."""

    def __init__(self, size: int, flip_p: float) -> None:
        if size < 1:
            raise ConfigError(f"image size must be a positive number of pixels, got {size}")
        self.size, self.flip_p = size, flip_p

    def pixels(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.place(img, self.draw_flip(generator))

    def draw_flip(self, generator: torch.Generator | None = None) -> bool:
        # eval draws nothing, so it never disturbs the caller's random stream
        return self.flip_p > 0 and torch.rand((), generator=generator).item() < self.flip_p

    def place(self, img: Tensor, flip: bool) -> Tensor:
        """uint8 ``(3, H, W)`` -> uint8 ``(3, S, S)`` on the image's device."""
        x = resize_square(img, self.size)
        return x.flip(-1) if flip else x

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return normalize(self.pixels(img, generator))


def eval_transform(size: int) -> Preset:
    """Resize to ``size x size`` and normalise; nothing random."""
    return Preset(size, flip_p=0.0)


def train_transform(size: int, flip_p: float = 0.5) -> Preset:
    """Like :func:`eval_transform` plus a horizontal flip with probability ``flip_p``, drawn
    from the ``generator`` passed at call time (the global torch RNG when ``None``)."""
    return Preset(size, flip_p=flip_p)
