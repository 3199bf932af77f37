"""bench/gpu_check.py runs end to end at toy size on the CPU, so the one script a GPU session
runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._engine_fixtures import ROOT, cli_env


@pytest.mark.slow
def test_gpu_check_smoke_run_on_cpu_fills_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_check.py"),
            "--device",
            "cpu",
            "--smoke",
            "--no-compile",
            "--workers",
            "0",  # loaders in the test's process: a worker's start costs more than its work
            "--out",
            str(out),
            "--work",
            str(tmp_path),
            "--budget",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(tmp_path),  # this process's thread count (one under xdist)
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["complete"] and report["errors"] == {} and "skipped" not in report
    train = report["train"]
    assert {"lcm, all speed-ups", "gap, all speed-ups", "lcm, all off"} <= set(train)
    assert all(row["images_per_s"] > 0 and row["loss_finite"] for row in train.values())
    assert {"lcm, gpu decode, folded", "lcm, model only"} <= set(report["predict"])
    assert all(row.get("images_timed", 1) > 0 for row in report["predict"].values())
    ckpt = report["checkpoint"]["lcm"]
    assert ckpt["written_mb"] > 0 and {"foreground_blocks_s", "background_blocks_s"} <= set(ckpt)
    assert (tmp_path / "profile-all-on.txt").read_text().strip()
