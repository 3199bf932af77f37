"""bench/compare_models.py at toy size on the CPU, so the README's comparison cannot rot:
every arm trains, the table has its rows and intervals, and a rerun skips finished runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests._engine_fixtures import ROOT

pytestmark = pytest.mark.slow


def test_comparison_smoke_run_writes_table_curves_and_resumes(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "compare_models.py"), "--profile", "smoke",
           "--device", "cpu", "--tiers", "interaction", "--arms", "gap", "lcm", "--out",
           str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    main = [r for r in rows if r["recipe"] == "recipe"]
    assert sorted((r["arm"], r["seed"]) for r in main) == [
        ("gap", 0), ("gap", 1), ("lcm", 0), ("lcm", 1),
    ]  # fmt: skip
    assert all(len(r["curve"]) == 1 and 0 <= r["mAP"] <= 1 for r in rows)
    assert all("aux_mAP" in r for r in rows if r["arm"] == "lcm")
    assert all(0 <= r["train_mAP"] <= 1 for r in rows)  # the train split beside val
    table = (tmp_path / "table.md").read_text()
    assert "| lcm_aux | 2 |" in table and "| lcm | plain+head_lr | 2 |" in table
    assert "train look-alike AP" in table and "Δ mAP vs q2l" in table
    assert (tmp_path / "curves.png").stat().st_size > 0
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "0 runs to do" in again.stdout
    (tmp_path / "table.md").unlink()
    more = [*cmd, "--seeds", "3", "--report-only"]  # a third seed planned, none started
    report = subprocess.run(more, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and "0 runs to do (16 done before)" in report.stdout
    assert "| lcm_aux | 2 |" in (tmp_path / "table.md").read_text()


def test_the_b32_study_profile_trains_the_comparisons_lcm_arm_at_batch_32():
    """`lcm ablate --profile b32`'s base point is the run `compare_models.py --batch 32` makes
    for `lcm` (same model, loss and recipe), so the studies' figures at that profile sit on the
    comparison's."""
    from bench.compare_models import Job, job_params
    from lcm.config import params_from_dict
    from lcm.studies import grids

    profile = grids.PROFILES["b32"]
    assert (profile.tier, profile.n_train, profile.size, profile.epochs, profile.batch) == (
        "interaction", 400, 128, 40, 32)  # fmt: skip
    for seed in (0, 1):
        study = params_from_dict(grids.point_params(grids.Point("depth", 3, seed), profile, "cpu"))
        compare = job_params(Job("interaction", "lcm", "recipe", seed, 40, 32), 128, "cpu")
        assert study == compare
