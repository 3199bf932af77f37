"""lcm/data/transforms.py: decoding, the presets and normalisation."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lcm.data.transforms import (
    MEAN,
    STD,
    decode_image,
    decode_images,
    eval_transform,
    normalize,
    resize_square,
    train_transform,
)
from lcm.errors import ConfigError
from tests._engine_fixtures import ROOT


def _jpeg(mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG")
    return buf.getvalue()


def test_decoding_gives_rgb_whatever_the_jpeg_and_the_batch_decoder_agrees():
    gray = decode_image(_jpeg("L"))
    assert gray.shape == (3, 30, 40) and gray.dtype == torch.uint8
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    data = [_jpeg(seed=s) for s in range(3)]
    for one, many in zip(
        (decode_image(d) for d in data), decode_images(data, torch.device("cpu")), strict=True
    ):
        assert torch.equal(one, many)
    with pytest.raises(RuntimeError):
        decode_image(data[0][: len(data[0]) // 2])
    assert decode_images([], torch.device("cpu")) == []


def test_normalize_is_the_imagenet_formula_into_a_given_buffer():
    img = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8)
    want = (img.float() / 255 - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    out = torch.empty(2, 3, 4, 5)
    assert normalize(img, out=out) is out
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="positive stds"):
        normalize(img, std=(0.2, 0.0, 0.2))


def test_eval_preset_draws_nothing_and_train_flips_from_its_generator():
    img = torch.arange(3 * 6 * 8, dtype=torch.uint8).view(3, 6, 8)
    gen = torch.Generator().manual_seed(7)
    before = gen.get_state()
    out = eval_transform(8).pixels(img, gen)
    assert torch.equal(gen.get_state(), before)  # eval never consumes the caller's stream
    assert out.shape == (3, 8, 8)
    always = train_transform(8, flip_p=1.0)
    assert torch.equal(always.pixels(img, gen), out.flip(-1))
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    flips = [train_transform(8).draw_flip(a) for _ in range(20)]
    assert flips == [train_transform(8).draw_flip(b) for _ in range(20)]
    assert 0 < sum(flips) < 20
    with pytest.raises(ConfigError, match="positive"):
        eval_transform(0)


@pytest.mark.parametrize(
    ("dtype", "native"),
    [(torch.uint8, True), (torch.uint8, False), (torch.float32, True), (torch.float16, True)],
)
def test_resize_square_is_torchvision_v2_resize_bit_for_bit(dtype, native, monkeypatch):
    """resize_square repeats torchvision.transforms.v2's resize without importing it (that
    module loads TorchDynamo): the same pixels, down and up, one image or a batch, contiguous
    or channels-last; uint8 also through float32 as on a GPU or a CPU without AVX2."""
    from torchvision.transforms.v2 import functional as F
    from torchvision.transforms.v2.functional import _geometry

    import lcm.data.transforms as T

    if not native:
        monkeypatch.setattr(T, "_native_uint8_bilinear", lambda: False)
        monkeypatch.setattr(_geometry, "_do_native_uint8_resize_on_cpu", lambda mode: False)

    g = torch.Generator().manual_seed(0)
    for h, w, size in [(37, 53, 16), (64, 48, 96), (32, 32, 32), (200, 120, 128), (5, 9, 7)]:
        img = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8).to(dtype)
        last = img.unsqueeze(0).contiguous(memory_format=torch.channels_last)[0]
        batch = torch.randint(0, 256, (2, 3, h, w), generator=g, dtype=torch.uint8).to(dtype)
        for x in (img, last, batch):
            ours, theirs = resize_square(x, size), F.resize(x, [size, size], antialias=True)
            assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
            assert torch.equal(ours, theirs), (h, w, size, x.shape, x.stride())
            assert ours.stride() == theirs.stride()


def test_the_image_path_leaves_torch_dynamo_unloaded():
    """Decoding, resizing and building a backbone import torchvision without TorchDynamo
    (~2 s a process: lcm/vision.py); torch.compile still finds the real module."""
    code = (
        "import sys; from lcm.data.transforms import eval_transform, decode_image; "
        "from lcm.models.backbones import create_backbone; "
        "create_backbone('resnet18'); assert 'torch._dynamo' not in sys.modules, 'loaded'; "
        "import torch; f = torch.compile(lambda a: a + 1, backend='eager'); "
        "assert f(torch.ones(1)).item() == 2 and 'torch._dynamo' in sys.modules; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
