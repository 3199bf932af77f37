"""`lcm export onnx`: images -> sigmoid scores with a dynamic batch, checked with onnxruntime."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from lcm.checkpoint import load_for_inference
from lcm.export import ExportError, export_onnx
from tests._engine_fixtures import cli_env, lcm_cmd


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The trained model's raw and EMA weights exported once each (an export takes seconds):
    {weights: (file, the exporter's result)}. Read-only."""
    root = tmp_path_factory.mktemp("onnx")
    return {w: (root / f"{w}.onnx", export_onnx(trained.model, root / f"{w}.onnx", weights=w))
            for w in ("raw", "ema")}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_onnx_scores_match_pytorch_at_any_batch(trained, exported, weights):
    out, res = exported[weights]
    assert set(res.max_abs_diff) == {1, 3}
    assert max(res.max_abs_diff.values()) < 1e-4

    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    loaded = load_for_inference(trained.model, weights, torch.device("cpu"), thresholds=False)
    assert json.loads(meta["lcm.classes"]) == list(loaded.meta.classes)
    assert int(meta["lcm.image_size"]) == loaded.meta.image_size
    assert meta["lcm.weights"] == weights and meta["lcm.model_sha256"] == loaded.digest

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = loaded.meta.image_size
    for b in (1, 3, 5):  # 5 was never seen by the exporter or the check
        x = torch.randn(b, 3, size, size)
        with torch.no_grad():
            expected = torch.sigmoid(loaded.model(x).logits).numpy()
        (got,) = session.run(["scores"], {"images": x.numpy()})
        assert got.shape == (b, len(loaded.meta.classes))
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_raw_and_ema_exports_differ(exported):
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    raw = ort.InferenceSession(str(exported["raw"][0])).run(None, {"images": x})[0]
    ema = ort.InferenceSession(str(exported["ema"][0])).run(None, {"images": x})[0]
    assert np.abs(raw - ema).max() > 1e-3


@pytest.mark.slow
def test_a_failed_check_leaves_no_file(trained, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="disagree"):
        export_onnx(trained.model, out, tolerance=0.0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_prints_the_differences_and_errors_are_one_line(trained, tmp_path):
    env = cli_env(tmp_path)
    out = tmp_path / "m.onnx"
    ok = subprocess.run(
        lcm_cmd("export", "onnx", "--checkpoint", str(trained.model), "--out", str(out)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "batch 1:" in ok.stdout and "batch 3:" in ok.stdout and out.is_file()
    bad = subprocess.run(
        lcm_cmd("export", "onnx", "--checkpoint", str(tmp_path / "none"), "--out", str(out)),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "model.json" in bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("read", ["attend", "direct", "attend_map", "attend_map+reread"])
def test_onnx_of_each_latent_context_read_matches_pytorch(tmp_path, read):
    """The redesign's reads (lcm.models.context), whichever is the default: the exporter's
    own check (batches 1 and 3, within 1e-4) and a batch it never saw."""
    from lcm.checkpoint import ModelMeta, save_model
    from lcm.config import ModelConfig
    from lcm.models import build_model

    torch.manual_seed(0)
    read, _, reread = read.partition("+")
    cfg = ModelConfig(dim=32, heads=4, ffn=32, depth=2, context_read=read, readout="context",
                      token_norm=True, embed_init=1.0, prototype_score="cosine",
                      reread=bool(reread))  # fmt: skip
    classes = ("a", "b", "c")
    save_model(tmp_path / "m", build_model(cfg, len(classes)),
               ModelMeta(cfg, classes, 64, (0.5,) * 3, (0.25,) * 3, {}), None)  # fmt: skip
    res = export_onnx(tmp_path / "m", tmp_path / "m.onnx")
    assert max(res.max_abs_diff.values()) < 1e-4
    loaded = load_for_inference(tmp_path / "m", "raw", torch.device("cpu"))
    x = torch.randn(5, 3, 64, 64)
    with torch.no_grad():
        expected = torch.sigmoid(loaded.model(x).logits).numpy()
    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"images": x.numpy()})[0]
    assert np.abs(got - expected).max() < 1e-4
