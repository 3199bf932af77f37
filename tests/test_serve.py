"""`lcm serve` against a real Prefect server: the schedule, a run of the deployment, its rows.

Starts `prefect server start` on 127.0.0.1 (a free port, a temporary PREFECT_HOME) and
`lcm serve`, then stops both by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest

from tests._engine_fixtures import cli_env, free_port, lcm_cmd
from tests._predict_fixtures import fetch

pytestmark = pytest.mark.slow


def wait_for(what, check, timeout, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:4]} exited with {p.returncode} while {what}"
        result = check()
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def stop(*procs, grace=20.0):
    """SIGTERM to every process group at once, SIGKILL to those still running ``grace`` s
    later."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_serve_runs_the_scheduled_deployment_into_duckdb(trained, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**cli_env(tmp_path), "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "serve")}  # noqa: SIM115
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=logs["server"],
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    serve = None
    try:
        client = httpx.Client(base_url=api, timeout=10)

        def healthy():
            try:
                return client.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the server's health", healthy, 120, [server])
        db = tmp_path / "nightly.duckdb"
        serve = subprocess.Popen(
            lcm_cmd(
                "serve",
                "--checkpoint",
                str(trained.model),
                "--shards",
                str(trained.shards),
                "--db",
                str(db),
                "--cron",
                "0 3 * * *",
                "--params",
                str(trained.model.parent / "params.yaml"),
            ),
            env={**env, "PREFECT_API_URL": api},
            cwd=tmp_path,
            stdout=logs["serve"],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def deployment(name):
            r = client.get(f"/deployments/name/{name}/{name}")
            return r.json() if r.status_code == 200 else None

        names = ("lcm-batch-predict", "lcm-train", "lcm-evaluate")
        found = wait_for(
            "the deployments", lambda: all(deployment(n) for n in names) and names, 120, [serve]
        )
        dep = deployment(found[0])
        assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 3 * * *"]
        assert dep["concurrency_limit"] == 1 or dep["global_concurrency_limit"]["limit"] == 1

        for _ in range(5):  # the test server's SQLite can answer 5xx once under load
            created = client.post(f"/deployments/{dep['id']}/create_flow_run", json={})
            if created.status_code < 500:
                break
            time.sleep(2)
        assert created.status_code in (200, 201), (created.status_code, created.text)
        run = created.json()

        def finished():
            state = client.get(f"/flow_runs/{run['id']}").json()["state"]
            assert state["type"] not in ("FAILED", "CRASHED", "CANCELLED"), state
            return state["type"] == "COMPLETED"

        wait_for("the flow run", finished, 180, [serve])
        scheduled = datetime.fromisoformat(run["expected_start_time"].replace("Z", "+00:00"))
        run_id = f"scheduled-{scheduled:%Y-%m-%d}"
    finally:
        for proc in (serve, server):
            if proc is not None:
                stop(proc)
        for f in logs.values():
            f.close()
    assert fetch(db, "SELECT run_id, status, n_images FROM runs") == [(run_id, "complete", 32)]
    assert fetch(db, "SELECT count(*) FROM predictions")[0][0] == 32 * 4
    assert fetch(db, "SELECT flow_run_id FROM runs")[0][0] == run["id"]


def test_serve_refuses_a_bad_cron_before_registering_anything(trained, tmp_path):
    env = {**cli_env(tmp_path), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    args = [
        "serve",
        "--checkpoint",
        str(trained.model),
        "--shards",
        str(trained.shards),
        "--db",
        str(tmp_path / "n.duckdb"),
    ]
    res = subprocess.run(
        lcm_cmd(*args, "--cron", "61 * * * *"), env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "invalid schedule" in res.stderr
    no_api = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    res = subprocess.run(lcm_cmd(*args), env=no_api, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "PREFECT_API_URL is not set" in res.stderr, res.stderr
