"""Prefect flow: one of the paper's studies on our benchmark (``lcm ablate``).

Every point of the grid (swept value x seed, and missing ratio for ``partial``) is one task,
retried once on an unexpected failure. A task trains in a spawned process
(:func:`lcm.studies.inmemory.train_in_memory`), one of ``jobs`` the flow call keeps and hands
the next point as each run ends (a process's start, imports included, costs ~5 s on a 2-core
machine). Every run seeds everything before it builds its model, so runs are independent of
their order and of which process trains them. A crash (a killed process) ends the runs then
in flight, not the flow: each is retried once, in fresh processes. ``jobs`` tasks run at once,
each process with ``cores / jobs`` threads on a CPU.

The flow is the one writer: as each run ends it appends the run to ``runs.jsonl`` and rebuilds
``results.csv``, ``studies.duckdb`` and the study's figure and table, so a cut-off call keeps
every finished point; a rerun skips them (runs are keyed by their full configuration).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.common import retry_unless_user_error
from lcm.errors import ConfigError, LcmError
from lcm.studies import grids, report, results


@dataclass(frozen=True)
class AblateRequest:
    """One ``lcm ablate`` call. ``None`` takes the grid's default (profile, seeds, values)."""

    study: str
    grid: str = "quick"
    seeds: int | None = None
    device: str = "auto"
    out: Path = Path("studies")
    profile: str | None = None
    values: tuple[float, ...] | None = None  # instead of the grid's values
    missing: tuple[float, ...] | None = None  # partial: instead of the grid's ratios
    jobs: int | None = None  # runs at once [default: CPU cores (1 thread each); GPU: 4]
    data: Path | None = None  # tier cache [default: OUT/data]
    budget: float | None = None  # seconds: no run starts once this is spent

    def check(self) -> None:
        if self.study not in grids.STUDIES:
            raise ConfigError(f"unknown study {self.study!r}; one of {', '.join(grids.STUDIES)}")
        if self.grid not in ("quick", "full"):
            raise ConfigError(f"unknown grid {self.grid!r}; quick or full")
        if self.profile is not None and self.profile not in grids.PROFILES:
            raise ConfigError(f"unknown profile {self.profile!r}; one of "
                              f"{', '.join(grids.PROFILES)}")  # fmt: skip
        if self.jobs is not None and self.jobs < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.jobs}")
        if self.missing and self.study != "partial":
            raise ConfigError("--missing applies to the partial study only")
        if self.budget is not None and self.budget < 0:
            raise ConfigError(f"--budget must not be negative, got {self.budget}")
        self.points()  # the grid's own checks
        from lcm.runtime import select_device

        select_device(self.device)  # `cuda` without a GPU fails here, before any work

    def profile_(self) -> grids.Profile:
        return grids.PROFILES[self.profile or self.grid]

    def points(self) -> list[grids.Point]:
        study = grids.STUDIES[self.study]
        seeds = self.seeds if self.seeds is not None else self.profile_().seeds
        return grids.plan(study, self.grid, seeds, self.values, self.missing)


@task(retries=1, retry_delay_seconds=2, retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE, task_run_name="{label}")  # fmt: skip
def train_point(label: str, params: dict[str, Any], tier_file: str, threads: int) -> dict:
    """Train one point of the grid in a spawned process (which imports the library's training
    path only: not Prefect, not this module): one of the flow call's (:func:`_spawned`), or a
    process of its own outside a flow call."""
    from lcm.studies.inmemory import train_point_in_process

    if _POOL.executor is None:
        with _spawn_pool(1) as pool:
            return pool.submit(train_point_in_process, params, tier_file, threads).result()
    return _POOL.run(train_point_in_process, params, tier_file, threads)


def _spawn_pool(jobs: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


class _Pool:
    """The flow call's training processes, shared by its tasks (they run in threads). A
    process that dies breaks the executor and every run in it; the first task to see that
    replaces it, so their retries start in fresh processes."""

    def __init__(self) -> None:
        self.executor: ProcessPoolExecutor | None = None
        self.jobs = 1
        self.lock = threading.Lock()

    def run(self, fn: Any, *args: Any) -> Any:
        with self.lock:
            executor = self.executor
            assert executor is not None, "outside _spawned()"
        try:
            return executor.submit(fn, *args).result()
        except BrokenProcessPool:
            with self.lock:
                if self.executor is executor:
                    self.executor = _spawn_pool(self.jobs)
            executor.shutdown(wait=False, cancel_futures=True)
            raise


_POOL = _Pool()


@contextmanager
def _spawned(jobs: int) -> Iterator[None]:
    """``jobs`` spawned processes for this flow call's runs, shut down when it ends."""
    with _POOL.lock:
        if _POOL.executor is not None:
            raise LcmError("another study is running in this process; run one at a time")
        _POOL.executor, _POOL.jobs = _spawn_pool(jobs), jobs
    try:
        yield
    finally:
        with _POOL.lock:
            executor, _POOL.executor = _POOL.executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores)"


def _label(point: grids.Point) -> str:
    missing = f" missing={point.missing:g}" if point.missing is not None else ""
    return f"{point.study}={point.value:g}{missing} seed={point.seed}"


@flow(name="lcm-ablate", log_prints=False, validate_parameters=False)
def ablate_flow(request: AblateRequest) -> dict[str, Any]:
    """Run the study's missing points, then write its results, figure and table."""
    from lcm.data.synthetic import interaction, story
    from lcm.runtime import select_device
    from lcm.studies.inmemory import build_tier

    log = logging.getLogger("lcm.ablate")  # shown by the CLI (Prefect's run logger is not)
    request.check()
    study, profile = grids.STUDIES[request.study], request.profile_()
    device = select_device(request.device)
    cores = os.cpu_count() or 1
    jobs = request.jobs or (cores if device.type == "cpu" else 4)
    threads = max(1, cores // jobs) if device.type == "cpu" else 1
    out = Path(request.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = profile.settings()
    keyed = []
    for point in request.points():
        params = grids.point_params(point, profile, device.type)
        keyed.append((point, results.run_key(settings, params), params))
    runs = results.read_runs(out)
    todo: dict[str, tuple[grids.Point, dict]] = {}
    for point, key, params in keyed:
        if key not in runs and key not in todo:
            todo[key] = (point, params)
    tier_file = ""
    if todo:  # a finished grid only redraws: no data needed
        tier_file = str(build_tier(request.data or out / "data", profile.tier, profile.n_train,
                                   profile.n_val, profile.size))  # fmt: skip
    num_classes = len((interaction if profile.tier == "interaction" else story).CLASSES)
    name = _device_name(device)
    log.info("%s: %d runs to do, %d done before; %s, %d at a time", study.name, len(todo),
             len({k for _, k, _ in keyed}) - len(todo), name, jobs)  # fmt: skip
    started, failed = time.perf_counter(), []
    pending = list(todo.items())
    inflight: dict[Any, tuple[str, grids.Point, dict]] = {}
    finished, spent, markdown = 0, [], None
    with _spawned(max(1, min(jobs, len(todo)))):  # the processes that train the runs
        while pending or inflight:
            over = request.budget is not None and time.perf_counter() - started > request.budget
            while pending and len(inflight) < jobs and not over:
                key, (point, params) = pending.pop(0)
                fut = train_point.submit(_label(point), params, tier_file, threads)
                inflight[fut] = (key, point, params)
            if not inflight:
                log.warning("budget of %.0f s spent: %d runs not started; rerun to continue",
                            request.budget, len(pending))  # fmt: skip
                break
            fut = next(as_completed(list(inflight)))
            key, point, params = inflight.pop(fut)
            try:
                row = fut.result()
            except LcmError:
                raise
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                failed.append(f"{_label(point)} ({type(e).__name__}: {e})")
                log.error("%s failed twice: %s", _label(point), e)
                continue
            finished += 1
            row = {"key": key, "settings": settings, "params": params, "device": name, **row}
            runs[key] = results.append_run(out, row)
            markdown = _write(study, profile, keyed, runs, out, num_classes)
            elapsed = time.perf_counter() - started
            spent.append(row["seconds"])
            left = sum(spent) / len(spent) * math.ceil((len(todo) - finished - len(failed)) / jobs)
            log.info("[%d/%d] %s: mAP %.1f (%.0f s); %.0f s so far, about %.0f s to go",
                     finished, len(todo), _label(point), 100 * row["mAP"], row["seconds"], elapsed,
                     left)  # fmt: skip
    if markdown is None:  # no run finished in this call: draw from the log alone
        markdown = _write(study, profile, keyed, runs, out, num_classes)
    create_markdown_artifact(key=f"ablate-{study.name}", markdown=markdown)
    if failed:
        raise LcmError(f"{len(failed)} of {len(todo)} runs failed (rerun to retry them): "
                       + "; ".join(failed))  # fmt: skip
    return {"markdown": markdown, "out": str(out), "ran": finished,
            "seconds": time.perf_counter() - started}  # fmt: skip


def _write(study: grids.Study, profile: grids.Profile, keyed: list, runs: dict, out: Path,
           num_classes: int) -> str:  # fmt: skip
    """The results tables (every finished run in the log) and this study's figure and table
    (this call's points)."""
    rows = results.result_rows(runs)
    results.write_tables(out, rows, runs)
    keys = {key for _, key, _ in keyed}
    mine = [r for r in rows if r["run_key"] in keys and r["study"] == study.name]
    if not mine:
        return f"no finished runs of the {study.name} study yet"
    extra = report.inference_cost(profile, num_classes) if study.name == "partial" else None
    return report.write_report(study, profile, mine, out / study.name, extra)
