"""Training engine: fit, checkpoints, exact resume after SIGKILL, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from lcm.checkpoint import load_for_inference, load_meta
from lcm.config import load_params
from lcm.data.shards import eval_loader, resolve_shards
from lcm.engine import fit
from lcm.errors import CheckpointError
from lcm.inference import predict
from lcm.metrics import evaluate_scores
from lcm.resume import load_state
from lcm.train_request import TrainRequest
from lcm.trainer import Ema
from tests._engine_fixtures import CLASSES, cli_env, lcm_cmd, write_params


def _request(params, tiny_data, out):
    return TrainRequest(params, str(tiny_data.train), out, str(tiny_data.val))


def test_fit_writes_checkpoint_and_reports_raw_and_ema(tiny_data, tmp_path):
    params = load_params(write_params(tmp_path / "params.yaml"))
    result = fit(_request(params, tiny_data, tmp_path / "model"))
    assert [row["epoch"] for row in result.history] == [1, 2]
    last = result.final
    # raw and EMA are both reported, under their own names; nothing picks the better one
    assert {"val_mAP", "val_ema_mAP", "train_loss"} <= set(last)
    # the per-epoch validation is a real evaluation of the saved weights, raw and EMA alike
    for which, key in (("raw", "val_mAP"), ("ema", "val_ema_mAP")):
        loaded = load_for_inference(tmp_path / "model", which, torch.device("cpu"))
        val = eval_loader(
            resolve_shards(tiny_data.val), batch_size=16, image_size=32, num_workers=0
        )
        _, scores, targets = predict(loaded.model, val, torch.device("cpu"))
        assert last[key] == pytest.approx(evaluate_scores(scores, targets, CLASSES).mAP, abs=1e-9)
    assert last["val_mAP"] != last["val_ema_mAP"]
    assert result.steps == 2 * (48 // 8)
    meta = load_meta(tmp_path / "model")
    assert meta.classes == ("red", "green", "blue", "square")
    assert meta.image_size == 32
    model = load_for_inference(tmp_path / "model", "ema", torch.device("cpu")).model
    assert model(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 4)
    state = load_state(tmp_path / "model")
    assert state["epoch"] == 2 and state["batch"] == 0 and state["step"] == result.steps
    history = json.loads((tmp_path / "model" / "history.json").read_text())
    assert history == result.history


def test_training_learns_the_tiny_task(tiny_data, tmp_path):
    params = load_params(write_params(tmp_path / "p.yaml", train={"epochs": 6, "ema_decay": None}))
    result = fit(_request(params, tiny_data, tmp_path / "model"))
    first, last = result.history[0], result.history[-1]
    assert last["train_loss"] < first["train_loss"]
    assert last["val_mAP"] > 0.7  # chance level is the label frequency, about 0.4
    assert "val_ema_mAP" not in last
    # no EMA: the file a pipeline declares exists, and loading it says why it cannot
    assert (tmp_path / "model" / "ema.safetensors").is_file()
    with pytest.raises(CheckpointError, match="without an EMA"):
        load_for_inference(tmp_path / "model", "ema", torch.device("cpu"))


def test_ema_tracks_weights():
    model = torch.nn.Linear(2, 2)
    ema = Ema(model, decay=0.5)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert not torch.equal(ema.module.weight, model.weight)
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.module.weight, model.weight)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended (rc {proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_matches_uninterrupted_run(tiny_data, tmp_path, prefect_api):
    params_file = write_params(tmp_path / "params.yaml", train={"checkpoint_every": 2})
    reference = fit(_request(load_params(params_file), tiny_data, tmp_path / "reference"))

    out = tmp_path / "killed"
    args = [
        "train",
        "--params",
        str(params_file),
        "--shards",
        str(tiny_data.train),
        "--val-shards",
        str(tiny_data.val),
        "--out",
        str(out),
        "--no-live",
    ]
    env = cli_env(tmp_path, prefect_api)
    proc = subprocess.Popen(
        lcm_cmd(*args),
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for(out / "state.pt", proc, timeout=240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and everything it started
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_state(out)
    assert killed_at["epoch"] == 0 and 0 < killed_at["batch"] < 6  # really mid-epoch
    assert not (out / "history.json").exists()

    done = subprocess.run(
        lcm_cmd(*args, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    resumed = json.loads((out / "history.json").read_text())
    assert resumed == reference.history  # bit-for-bit the same metrics, every epoch


@pytest.mark.slow
def test_ddp_two_processes_disjoint_equal_steps(tiny_data, tmp_path, prefect_api):
    """`lcm train --nproc 2` goes through the Prefect flow, which starts two ranks of
    `python -m lcm.train_rank` with torchrun."""
    params_file = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    out = tmp_path / "ddp"
    cmd = lcm_cmd(
        "train",
        "--params",
        str(params_file),
        "--shards",
        str(tiny_data.train),
        "--val-shards",
        str(tiny_data.val),
        "--out",
        str(out),
        "--no-live",
        "--record-keys",
        "--nproc",
        "2",
    )
    env = {**cli_env(tmp_path, prefect_api), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "trained" in done.stdout  # the CLI got the history back from the flow
    request = json.loads((out / "train_request.json").read_text())
    assert request["nproc"] == 2 and request["record_keys"] is True
    keys = [(out / "ranks" / f"epoch0-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == (48 // (2 * 8)) * 8  # same number of steps
    assert not set(keys[0]) & set(keys[1])  # disjoint samples
    assert load_state(out)["step"] == 48 // (2 * 8)
    loaded = load_for_inference(out, "raw", torch.device("cpu"))
    model, meta = loaded.model, loaded.meta
    assert meta.classes == ("red", "green", "blue", "square")
    assert model(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 4)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "params_extra", "fragment"),
    [
        ([], {"train": {"epochz": 1}}, "unknown key 'epochz'"),
        ([], {"train": {"epochs": "two"}}, "train.epochs: expected an integer"),
        (["--shards", "nowhere/*.tar"], {}, "nowhere/*.tar"),
        ([], {"train": {"device": "cuda"}}, "no CUDA device"),
        (["--mask", "MASK"], {}, "mask"),
        (["--resume"], {"model": {"depth": 2}}, "another architecture"),
    ],
)
def test_bad_input_fails_before_training_with_one_line(
    tiny_data, tmp_path, extra, params_extra, fragment
):
    if "--resume" in extra:  # a checkpoint of another architecture to resume from
        params = load_params(write_params(tmp_path / "p0.yaml", train={"epochs": 1}))
        fit(TrainRequest(params, str(tiny_data.train), tmp_path / "out"))
    if "MASK" in extra:  # a mask file whose keys do not match the shards
        from lcm.data.manifest import ImageRecord, write_manifest
        from lcm.data.masks import make_mask

        other = tmp_path / "other"
        write_manifest(
            other,
            ("red", "green", "blue", "square"),
            [ImageRecord("zzz", "zzz.jpg", (0,), (), 4, 4)],
        )
        make_mask(other, 0.5, 0, tmp_path / "mask.parquet")
        extra = ["--mask", str(tmp_path / "mask.parquet")]
    if torch.cuda.is_available() and "cuda" in fragment:
        pytest.skip("this machine has a GPU")
    params_file = write_params(tmp_path / "params.yaml", **params_extra)
    args = [
        "train",
        "--params",
        str(params_file),
        "--shards",
        str(tiny_data.train),
        "--out",
        str(tmp_path / "out"),
        "--no-live",
        *extra,
    ]
    done = subprocess.run(
        lcm_cmd(*args), env=cli_env(tmp_path), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert fragment in lines[0]
    assert "Traceback" not in done.stderr
