"""The paper's studies (`lcm ablate`) and pictures (`lcm visualize`) at toy size.

What must hold: a study's grid trains every point once (the base configuration once for all
four single-setting studies), a rerun trains nothing, a cut-off log loses only the torn line;
the results table holds every point with its params; the trend fit reads a known curve right;
the in-memory partial-label protocol hides exactly what `lcm data mask` hides.
"""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from lcm.data.manifest import read_manifest, targets_from_lists
from lcm.data.masks import make_mask, read_mask
from lcm.errors import ConfigError, DataError, LcmError
from lcm.studies import grids, report, results
from lcm.studies.inmemory import build_tier, hide_targets, train_in_memory
from tests._engine_fixtures import ROOT, cli_env, lcm_cmd

TINY = grids.PROFILES["tiny"]


# ------------------------------------------------------------------------------------- grids
def test_quick_grids_and_seeds():
    depth = grids.plan(grids.STUDIES["depth"], "quick", 2)
    assert [(p.value, p.seed) for p in depth] == [(1, 0), (3, 0), (6, 0), (1, 1), (3, 1), (6, 1)]
    partial = grids.plan(grids.STUDIES["partial"], "quick", 1)
    assert {(p.missing, p.value) for p in partial} == {(0.1, 0.1), (0.1, 0.4), (0.9, 0.1),
                                                       (0.9, 0.4)}  # fmt: skip
    assert len(grids.plan(grids.STUDIES["partial"], "full", 5)) == 3 * 6 * 5
    assert [p.value for p in grids.plan(grids.STUDIES["depth"], "full", 1)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    "study, values, missing, message",
    [("depth", (0,), None, "whole number"), ("depth", (2.5,), None, "whole number"),
     ("mask-ratio", (1.5,), None, "[0, 1]"), ("alpha", (-1,), None, "negative"),
     ("partial", (0.1,), (1.0,), "(0, 1)")],
)  # fmt: skip
def test_bad_grid_values_are_refused(study, values, missing, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        grids.plan(grids.STUDIES[study], "quick", 1, values, missing)


def test_the_base_configuration_is_a_point_of_every_single_setting_study():
    base = grids.point_params(grids.Point("depth", 3, 0), TINY, "cpu")
    found = grids.memberships(TINY.settings(), base)
    assert sorted((p.study, p.value) for p in found) == [
        ("alpha", 1.0), ("beta", 0.1), ("depth", 3.0), ("mask-ratio", 0.1)]  # fmt: skip
    deep = grids.point_params(grids.Point("depth", 6, 1), TINY, "cpu")
    assert [(p.study, p.value, p.seed) for p in grids.memberships(TINY.settings(), deep)] == [
        ("depth", 6.0, 1)]  # fmt: skip
    part = grids.point_params(grids.Point("partial", 0.4, 0, 0.9), TINY, "cpu")
    assert [(p.study, p.missing) for p in grids.memberships(TINY.settings(), part)] == [
        ("partial", 0.9)]  # fmt: skip
    assert grids.memberships({**TINY.settings(), "epochs": 99}, base) == []


def test_run_key_covers_the_configuration_not_the_device():
    p = grids.point_params(grids.Point("alpha", 2, 0), TINY, "cpu")
    s = TINY.settings()
    assert results.run_key(s, p) == results.run_key(
        s, grids.point_params(grids.Point("alpha", 2, 0), TINY, "cuda"))  # fmt: skip
    other_seed = grids.point_params(grids.Point("alpha", 2, 1), TINY, "cpu")
    assert results.run_key(s, p) != results.run_key(s, other_seed)
    assert results.run_key(s, p) != results.run_key({**s, "epochs": 2}, p)


# ------------------------------------------------------------------------------------ results
def test_a_torn_last_line_is_dropped_and_any_other_bad_line_is_an_error(tmp_path):
    results.append_run(tmp_path, {"key": "a", "mAP": 0.5})
    results.append_run(tmp_path, {"key": "b", "mAP": 0.6})
    log = tmp_path / results.RUNS_FILE
    log.write_text(log.read_text() + '{"key": "c", "mA')
    assert sorted(results.read_runs(tmp_path)) == ["a", "b"]
    log.write_text('{"key": "a"\n' + log.read_text())
    with pytest.raises(DataError, match=r"runs.jsonl:1: not a run record"):
        results.read_runs(tmp_path)


# ------------------------------------------------------------------------------------- report
def _sweep(means: dict[float, float], noise: float, seeds: int = 3):
    rng = np.random.default_rng(0)
    x = np.repeat(list(means), seeds)
    y = np.array([means[v] for v in x]) + rng.normal(0, noise, len(x))
    return x.astype(float), y


def test_the_trend_fit_reads_a_known_curve():
    x, y = _sweep({1: 80.0, 3: 84.0, 6: 81.0}, 0.2)
    agree = report.read_sweep(x, y, 3, "depth")
    assert agree.best == 3 and agree.verdict.startswith("**agrees**")
    assert not agree.gap.covers_zero  # 3 clearly ahead of 6
    x, y = _sweep({0: 70.0, 0.1: 75.0, 0.5: 80.0}, 0.2)
    disagree = report.read_sweep(x, y, 0.1, "r")
    assert disagree.best == 0.5 and disagree.verdict.startswith("**disagrees**")
    assert disagree.trend.lo > 0  # mAP rises with r
    x, y = _sweep({0: 70.0, 1: 70.5, 3: 70.2}, 3.0)
    assert report.read_sweep(x, y, 1, "alpha").gap.covers_zero


def test_the_partial_interaction_term_has_the_papers_sign_when_beta_helps_more_when_missing():
    m = np.repeat([0.1, 0.1, 0.9, 0.9], 3)
    beta = np.repeat([0.1, 0.4, 0.1, 0.4], 3)
    y = 80 - 10 * m + 20 * m * beta + np.random.default_rng(1).normal(0, 0.1, len(m))
    est = report.interaction(m, beta, y)
    assert est.lo > 0 and math.isclose(est.value, 20, abs_tol=1)


def test_inference_cost_of_the_branch_is_counted_equal():
    text = " ".join(report.inference_cost(TINY, 12))
    assert "the same" in text and "GMACs" in text


# ----------------------------------------------------------------------------------- in memory
def test_hidden_targets_are_exactly_the_mask_lcm_data_mask_writes(tiny_data, tmp_path):
    manifest = read_manifest(tiny_data.prepared_train)
    t = manifest.table
    labels, ignore = t.column("labels").to_pylist(), t.column("ignore").to_pylist()
    targets = torch.from_numpy(targets_from_lists(labels, ignore, manifest.num_classes))
    make_mask(tiny_data.prepared_train, 0.5, 7, tmp_path / "m.parquet")
    mask = read_mask(tmp_path / "m.parquet")
    hidden = hide_targets(targets, 0.5, 7)
    expected = np.stack([mask[k] for k in t.column("key").to_pylist()])
    assert np.array_equal((hidden >= 0).numpy(), expected)
    assert 0.3 < float((hidden < 0).float().mean()) < 0.7


@pytest.fixture(scope="module")
def tiny_tier(tmp_path_factory) -> Path:
    return build_tier(tmp_path_factory.mktemp("tier"), "interaction", TINY.n_train, TINY.n_val,
                      TINY.size)  # fmt: skip


def test_in_memory_training_is_deterministic_and_scores_every_epoch(tiny_tier, one_thread):
    from lcm.config import params_from_dict

    raw = grids.point_params(grids.Point("partial", 0.1, 0, 0.5), TINY, "cpu")
    raw["train"]["epochs"] = 2
    params = params_from_dict(raw)
    a, b = train_in_memory(params, tiny_tier), train_in_memory(params, tiny_tier)
    assert len(a["curve"]) == 2 and len(a["aux_curve"]) == 2
    assert a["mAP"] == b["mAP"] and a["curve"] == b["curve"]
    assert set(a["per_class"]) == set(torch.load(tiny_tier, weights_only=True)["classes"])
    # the final weights scored on the train split too (against its full labels)
    assert 0 <= a["train_mAP"] <= 1 and set(a["train_per_class"]) == set(a["per_class"])
    assert a["train_mAP"] != a["mAP"] and a["train_lookalike_AP"] is not None
    looks = [v for k, v in a["per_class"].items() if k in {"cup", "tyre", "lemon", "ball", "mouse",
             "stapler", "bread", "plank"} and not math.isnan(v)]  # fmt: skip
    assert a["lookalike_AP"] == pytest.approx(np.mean(looks))


def test_scoring_fewer_epochs_changes_no_final_metric(tiny_tier, one_thread):
    from lcm.config import params_from_dict

    raw = grids.point_params(grids.Point("depth", 1, 0), TINY, "cpu")
    raw["train"]["epochs"] = 9
    params = params_from_dict(raw)
    every, sparse = train_in_memory(params, tiny_tier), train_in_memory(params, tiny_tier,
                                                                        score_every=4)  # fmt: skip
    assert every["curve_epochs"] == list(range(1, 10))
    assert sparse["curve_epochs"] == [4, 5, 6, 7, 8, 9]  # every 4th, and each of the last 5
    assert sparse["curve"] == every["curve"][3:]
    for key in ("mAP", "train_mAP", "CF1", "OF1", "per_class", "aux_mAP"):
        assert sparse[key] == every[key], key


# ---------------------------------------------------------------------------------------- CLI
def _said(done: subprocess.CompletedProcess) -> str:
    return " ".join((done.stdout + done.stderr).split())  # log lines come wrapped


@pytest.mark.slow
def test_ablate_depth_quick_two_seeds_writes_table_and_figure_then_resumes(tmp_path, prefect_api):
    """The acceptance command at toy size: a 2-point grid, 2 seeds, tiny model."""
    out = tmp_path / "studies"
    cmd = lcm_cmd("ablate", "--study", "depth", "--grid", "quick", "--seeds", "2", "--profile",
                  "tiny", "--values", "1,3", "--device", "cpu", "--out", str(out))  # fmt: skip
    env = cli_env(tmp_path, prefect_api)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 runs to do, 0 done before" in _said(done)
    table = (out / "depth" / "tiny.md").read_text()
    assert "| 1 | 2 |" in table and "| 3 | 2 |" in table and "Paper's best on our data" in table
    assert (out / "depth" / "tiny.png").stat().st_size > 10_000
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    depth = [r for r in rows if r["study"] == "depth"]
    assert sorted((float(r["value"]), int(r["seed"])) for r in depth) == [
        (1, 0), (1, 1), (3, 0), (3, 1)]  # fmt: skip
    assert json.loads(depth[0]["params"])["model"]["depth"] in (1, 3)
    assert all(0 <= float(r["train_mAP"]) <= 1 for r in rows)  # beside the val mAP
    assert all(0 <= float(r["train_lookalike_AP"]) <= 1 for r in rows)
    # the depth-3 runs are the base configuration: points of the other three studies too
    assert {r["study"] for r in rows} == {"depth", "mask-ratio", "alpha", "beta"}
    con = duckdb.connect(str(out / "studies.duckdb"), read_only=True)
    try:
        n_runs = con.execute("SELECT count(*) FROM ablation_runs").fetchone()[0]
        n_rows = con.execute("SELECT count(*) FROM ablation_results").fetchone()[0]
    finally:
        con.close()
    assert (n_runs, n_rows) == (4, len(rows))

    log = out / results.RUNS_FILE
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])  # a call cut off mid-write
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 runs to do, 3 done before" in _said(again)
    assert len(results.read_runs(out)) == 4 and len(log.read_text().splitlines()) == 4
    last = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert "0 runs to do, 4 done before" in _said(last)


def test_a_study_reuses_its_processes_and_replaces_a_dead_one():
    """flows/ablate.py: the runs of one call share ``jobs`` spawned processes (a start costs
    ~5 s); a process that dies fails the runs in it, and the retry gets a fresh process."""
    import os
    from concurrent.futures.process import BrokenProcessPool

    from flows.ablate import _POOL, _spawned

    with _spawned(1):
        first, again = _POOL.run(os.getpid), _POOL.run(os.getpid)
        assert first == again != os.getpid()  # one spawned process, reused
        with pytest.raises(BrokenProcessPool):
            _POOL.run(os._exit, 1)  # the process dies mid-run
        fresh = _POOL.run(os.getpid)
        assert fresh not in (first, os.getpid())
        with pytest.raises(LcmError, match="one at a time"), _spawned(1):
            pass
    assert _POOL.executor is None  # shut down with the call


@pytest.mark.parametrize(
    "args, message",
    [(["--study", "width"], "unknown study 'width'"),
     (["--study", "depth", "--values", "0"], "whole number"),
     (["--study", "depth", "--values", "a,b"], "comma-separated numbers"),
     (["--study", "beta", "--missing", "0.5"], "partial study only"),
     (["--study", "depth", "--grid", "huge"], "unknown grid")],
)  # fmt: skip
def test_ablate_refuses_bad_requests_before_any_work(tmp_path, args, message):
    cmd = lcm_cmd("ablate", *args, "--out", str(tmp_path / "s"))
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(tmp_path), timeout=120)
    assert done.returncode == 1 and message in _said(done)
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------------------------- visualize
def test_attention_figure_of_a_trained_model(trained, tmp_path):
    from lcm.visualize import attention_figure

    image = sorted(trained.images.glob("*.jpg"))[0]
    shown = attention_figure(trained.model, image, tmp_path / "a.png", top=2)
    assert 1 <= len(shown) <= 2 and all(0 <= s <= 1 and -1e-6 <= o <= 1 + 1e-6 for _, s, o in shown)
    assert (tmp_path / "a.png").stat().st_size > 5_000
    chosen = attention_figure(trained.model, image, tmp_path / "b.png", labels=["red", "blue"])
    assert [name for name, *_ in chosen] == ["red", "blue"]
    with pytest.raises(ConfigError, match="unknown label 'zebra'"):
        attention_figure(trained.model, image, tmp_path / "c.png", labels=["zebra"])
    with pytest.raises(DataError, match="no such image file"):
        attention_figure(trained.model, tmp_path / "none.jpg", tmp_path / "c.png")
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.jpg: not a decodable"):
        attention_figure(trained.model, tmp_path / "bad.jpg", tmp_path / "c.png")
    assert not (tmp_path / "c.png").exists()


def test_tsne_figure_of_a_trained_model(trained, tmp_path):
    from lcm.visualize import tsne_figure

    got = tsne_figure(trained.model, str(trained.shards), tmp_path / "t.png", max_images=24)
    assert len(got["silhouette"]) == 3 and all(-1 <= v <= 1 for v in got["silhouette"].values())
    assert all(0 <= v <= 1 for v in got["knn"].values())
    assert (tmp_path / "t.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_spent_budget_starts_no_run_and_says_so(tmp_path, prefect_api):
    out = tmp_path / "s"
    cmd = lcm_cmd("ablate", "--study", "alpha", "--profile", "tiny", "--budget", "0",
                  "--device", "cpu", "--out", str(out))  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=cli_env(tmp_path, prefect_api),
                          cwd=ROOT, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 runs not started; rerun to continue" in _said(done)
    assert results.read_runs(out) == {}


def test_attention_with_a_gap_baseline_adds_its_class_activation_maps(trained, tmp_path):
    """An untrained gap model is enough to check the column and the checks around it."""
    import dataclasses

    from lcm.checkpoint import load_meta, save_model
    from lcm.models import build_model
    from lcm.visualize import attention_figure

    meta = load_meta(trained.model)
    gap_meta = dataclasses.replace(meta, model=dataclasses.replace(meta.model, arch="gap"))
    save_model(tmp_path / "gap", build_model(gap_meta.model, len(meta.classes)), gap_meta, None)
    image = sorted(trained.images.glob("*.jpg"))[0]
    shown = attention_figure(trained.model, image, tmp_path / "a.png", labels=["red"],
                             baseline=tmp_path / "gap")  # fmt: skip
    assert [name for name, *_ in shown] == ["red"] and (tmp_path / "a.png").exists()
    with pytest.raises(ConfigError, match="a 'gap' model; this needs an 'lcm' checkpoint"):
        attention_figure(tmp_path / "gap", image, tmp_path / "b.png")


def test_partial_report_puts_the_papers_table_beside_ours(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"study": "partial", "value": b, "missing": m, "seed": s, "device": "CPU (2 cores)",
             "mAP": (80 - 40 * m - 10 * b + 12 * m * b + rng.normal(0, 0.3)) / 100,
             "aux_mAP": None}
            for m in (0.1, 0.9) for b in (0.1, 0.4) for s in range(3)]  # fmt: skip
    text = report.write_report(grids.STUDIES["partial"], TINY, rows, tmp_path,
                               report.inference_cost(TINY, 12))  # fmt: skip
    assert "| 10% | 0.1 | 3 |" in text and "| 83.5 |" in text and "| 73.1 |" in text
    assert "**10% missing**" in text and "**agrees**: beta 0.1 is best" in text
    assert "larger beta) on our data: **agrees**" in text
    assert (tmp_path / "tiny.png").stat().st_size > 10_000 and (tmp_path / "tiny.md").exists()


def test_knn_accuracy_counts_neighbours_of_the_same_label():
    from lcm.visualize import knn_accuracy

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 10
    labels = np.repeat([0, 1, 2], 20)
    x = centres[labels] + rng.normal(size=(60, 8))
    assert knn_accuracy(x, labels) == 1.0
    assert knn_accuracy(rng.normal(size=(60, 8)), labels) < 0.6


@pytest.mark.parametrize("read", ["dot", "direct"])
def test_anchor_reach_counts_each_maps_mass_on_anchor_boxes(tmp_path, read, one_thread):
    """`lcm visualize reach` against a second computation: boxes rasterised at full
    resolution, a cell counts when any of its pixels lies in an anchor box."""
    from lcm.checkpoint import ModelMeta, save_model
    from lcm.config import ModelConfig
    from lcm.data.synthetic import generate_synthetic
    from lcm.data.transforms import decode_image_file, eval_transform, normalize
    from lcm.models import build_model
    from lcm.reach import anchor_reach, reach_table

    raw = tmp_path / "raw"
    generate_synthetic(raw, n_train=2, n_val=6, size=64, tier="interaction")
    doc = json.loads((raw / "annotations" / "instances_val.json").read_text())
    classes = tuple(c["name"] for c in doc["categories"])
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, heads=4, ffn=32, depth=1, context_read=read, token_norm=True)
    model = build_model(cfg, len(classes))
    meta = ModelMeta(cfg, classes, 64, (0.5,) * 3, (0.25,) * 3, {})
    save_model(tmp_path / "model", model, meta, None)
    got = anchor_reach(tmp_path / "model", raw, "val", max_images=4)

    roles = {c["id"]: c["supercategory"] for c in doc["categories"]}
    names = {c["id"]: c["name"] for c in doc["categories"]}
    sums: dict[str, list[float]] = {}
    model.eval()
    for im in sorted(doc["images"], key=lambda i: i["file_name"])[:4]:
        data = (raw / "images" / "val" / im["file_name"]).read_bytes()
        px = eval_transform(64).pixels(decode_image_file(data))
        with torch.no_grad():
            f = model.forward_features(normalize(px[None], mean=meta.mean, std=meta.std))
        full = torch.zeros(64, 64)
        anns = [a for a in doc["annotations"] if a["image_id"] == im["id"]]
        for a in anns:
            if roles[a["category_id"]] == "anchor":
                x, y, w, h = (v * 64 / im["width"] for v in a["bbox"])
                full[math.floor(y) : math.ceil(y + h), math.floor(x) : math.ceil(x + w)] = 1
        cells = torch.nn.functional.max_pool2d(full[None, None], 32)[0, 0].bool()  # (2, 2)
        for name in {names[a["category_id"]] for a in anns}:
            c = classes.index(name)
            pair = [f["class_attention"][0, c][cells].sum().item(),
                    f["context_map"][0, c][cells].sum().item()]  # fmt: skip
            sums.setdefault(name, []).append(pair)
    assert set(got) == set(sums)
    for name, pairs in sums.items():
        mean = np.mean(pairs, axis=0)
        assert got[name]["images"] == len(pairs)
        assert got[name]["class_aware"] == pytest.approx(mean[0], abs=1e-6)
        assert got[name]["context"] == pytest.approx(mean[1], abs=1e-6)
    assert reach_table(got).count("\n") == 2 + len(got)
    with pytest.raises(DataError, match="not found"):
        anchor_reach(tmp_path / "model", tmp_path, "val")
