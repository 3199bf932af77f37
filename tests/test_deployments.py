"""prefect.yaml, a work pool and workers, and failure notifications, against real processes.

One `prefect server start` (127.0.0.1, a free port, a temporary PREFECT_HOME) for the module,
`prefect work-pool create lcm --type process` and `prefect deploy --all` from the repository
root, as the README shows them; `prefect worker start --pool lcm` processes and a local HTTP
server that plays the team's channel. Every process is started here and stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpx
import pytest
import yaml

from tests._engine_fixtures import ROOT, cli_env, free_port, lcm_cmd
from tests._predict_fixtures import fetch, stored
from tests.test_serve import stop, wait_for

pytestmark = pytest.mark.slow
PREDICT = "lcm-batch-predict/lcm-batch-predict"


def prefect(env, *args, check=True):
    done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server with the pool created, two workers polling it and prefect.yaml
    deployed; yields (env, client, workers). The workers serve every test of the module: a
    test waits for its own flow runs, so whichever worker takes one does not matter."""
    tmp = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    # workers poll every second; a run refused a concurrency slot is retried after 2 s, not 30
    env = {**cli_env(tmp, f"http://127.0.0.1:{port}/api"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2"}  # fmt: skip
    log = open(tmp / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
         str(port)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    client = httpx.Client(base_url=env["PREFECT_API_URL"], timeout=20)
    workers = []
    try:

        def healthy():
            try:
                return client.get("/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the server's health", healthy, 180, [proc])
        prefect(env, "work-pool", "create", "lcm", "--type", "process")
        workers = [worker(env, tmp, f"w{i}") for i in (1, 2)]  # they start while deploy runs
        prefect(env, "deploy", "--all")
        yield env, client, workers
    finally:
        # Prefect workers outlast a SIGTERM by 20 s and more under load; how they stop is not
        # under test here, so they get 2 s
        stop(*workers, grace=2)
        for w in workers:
            w.log.close()
        stop(proc)
        log.close()


def worker(env, tmp_path, name):
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "lcm", "--name", name],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    proc.log = log
    return proc


def trigger(client, name, **parameters):
    dep = client.get(f"/deployments/name/{name}").json()
    for _ in range(5):  # the server's SQLite can answer 5xx once under load
        created = client.post(f"/deployments/{dep['id']}/create_flow_run",
                              json={"parameters": parameters})  # fmt: skip
        if created.status_code < 500:
            break
        time.sleep(2)
    assert created.status_code in (200, 201), created.text
    return created.json()


def final_state(client, run, procs, timeout=300):
    def done():
        state = client.get(f"/flow_runs/{run['id']}").json()["state"]
        return state if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_for(f"flow run {run['name']}", done, timeout, procs)


def test_prefect_yaml_defaults_are_params_yaml_values():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())
                   ["deployments"]}  # fmt: skip
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    predict = deployments["lcm-batch-predict"]["parameters"]
    evaluate = deployments["lcm-evaluate"]["parameters"]
    for section, given in (("predict", predict), ("evaluate", evaluate)):
        for key in ("weights", "batch_size"):
            assert given[key] == params[section][key], (section, key)
    name = params["data"]["name"]
    assert predict["checkpoint"] == deployments["lcm-train"]["parameters"]["out_dir"]
    assert predict["shards"] == f"data/shards/{name}/val"
    assert deployments["lcm-train"]["parameters"]["params_file"] == "params.yaml"


def test_deploy_all_declares_the_three_deployments(server):
    _, client, _ = server
    dep = client.get(f"/deployments/name/{PREDICT}").json()
    assert [(s["schedule"]["cron"], s["schedule"]["timezone"]) for s in dep["schedules"]] == [
        ("0 3 * * *", "UTC")]  # fmt: skip
    assert dep["work_pool_name"] == "lcm" and dep["entrypoint"] == (
        "flows/predict.py:batch_predict_flow")  # fmt: skip
    limit = dep.get("concurrency_limit") or (dep.get("global_concurrency_limit") or {}).get("limit")
    assert limit == 1
    assert dep["parameters"]["db"] == "predictions/nightly.duckdb"
    for name, entry in (
        ("lcm-train/lcm-train", "flows/train.py:train_flow"),
        ("lcm-evaluate/lcm-evaluate", "flows/evaluate.py:evaluate_flow"),
    ):
        other = client.get(f"/deployments/name/{name}").json()
        assert other["entrypoint"] == entry and not other["schedules"]  # on demand


def test_a_worker_runs_a_triggered_batch_prediction_as_the_cli_does(server, trained, tmp_path):
    env, client, workers = server
    db, ref = tmp_path / "store.duckdb", tmp_path / "ref.duckdb"
    run = trigger(client, PREDICT, checkpoint=str(trained.model), shards=str(trained.shards),
                  db=str(db), run_id="night", batch_size=3)  # fmt: skip
    state = final_state(client, run, workers)
    assert state["type"] == "COMPLETED", state
    args = ["batch-predict", "--checkpoint", str(trained.model), "--shards", str(trained.shards),
            "--db", str(ref), "--run-id", "night", "--batch-size", "3"]  # fmt: skip
    cli = subprocess.run(lcm_cmd(*args), env=env, capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert stored(db, "night") == stored(ref, "night")
    assert fetch(db, "SELECT status, flow_run_id, deployment FROM runs") == [
        ("complete", run["id"], "lcm-batch-predict")]  # fmt: skip
    artifacts = client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {
        "any_": [run["id"]]}}}).json()  # fmt: skip
    report = next(a for a in artifacts if a["key"] == "batch-predict-report")["data"]
    assert "labels predicted most often" in report and "http" not in report


class _Channel(BaseHTTPRequestHandler):
    posts: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Channel.posts.append(json.loads(body or b"{}"))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_failed_run_ends_in_one_line_and_one_notification(server, trained, tmp_path):
    env, client, workers = server
    channel = HTTPServer(("127.0.0.1", free_port()), _Channel)
    threading.Thread(target=channel.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{channel.server_port}/hook"
    done = subprocess.run(lcm_cmd("alerts", "--url", url), env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "lcm-flow-run-failed" in done.stdout, done.stderr
    try:
        run = trigger(client, PREDICT, checkpoint=str(trained.model), shards="/no/such/shards",
                      db=str(tmp_path / "s.duckdb"))  # fmt: skip
        state = final_state(client, run, workers)
        assert state["type"] == "FAILED", state
        assert "/no/such/shards" in state["message"] and "\n" not in state["message"].strip()
        wait_for("the notification", lambda: _Channel.posts, 120, workers)
        missing = trigger(client, PREDICT, checkpoint="/no/such/model", shards=str(trained.shards),
                          db=str(tmp_path / "s.duckdb"))  # fmt: skip
        state = final_state(client, missing, workers)
        assert state["type"] == "FAILED" and "/no/such/model" in state["message"], state
        assert "\n" not in state["message"].strip() and "Traceback" not in state["message"]
        # the second failure's notification arrives after any repeat of the first one would
        wait_for(
            "the second notification",
            lambda: any(missing["name"] in json.dumps(p) for p in _Channel.posts),
            120,
            workers,
        )
    finally:
        channel.shutdown()
    first = [p for p in _Channel.posts if run["name"] in json.dumps(p)]
    assert len(first) == 1, _Channel.posts
    text = json.dumps(first[0])
    assert "lcm-batch-predict" in text and str(tmp_path / "s.duckdb") in text


def test_two_workers_two_triggers_of_one_night_score_it_once(server, trained, tmp_path):
    env, client, workers = server
    db = tmp_path / "store.duckdb"
    params = {"checkpoint": str(trained.model), "shards": str(trained.shards), "db": str(db),
              "batch_size": 3}  # fmt: skip
    runs = [trigger(client, PREDICT, **params) for _ in range(2)]  # the same night
    states = [final_state(client, run, workers) for run in runs]
    assert [s["type"] for s in states] == ["COMPLETED", "COMPLETED"], states
    assert fetch(db, "SELECT count(*), count(DISTINCT run_id) FROM runs") == [(1, 1)]
    total, distinct = fetch(db, "SELECT count(*), count(DISTINCT (image_key, label_id)) "
                                "FROM predictions")[0]  # fmt: skip
    assert total == distinct == 32 * 4
