"""Shared fixtures: the tiny datasets and the trained model several test modules use (built
once per session), and one temporary Prefect server for every flow test.

The builders behind them live in tests/_*_fixtures.py, imported as ``tests._..._fixtures``.
"""

from __future__ import annotations

import os

import pytest

from tests._engine_fixtures import TinyData, make_tiny_data
from tests._predict_fixtures import Trained, make_trained


def pytest_configure(config) -> None:
    """Under pytest-xdist (``make test``: two workers on two cores) each worker, and the `lcm`
    subprocesses it starts (``cli_env``), computes on one intra-op thread (a fresh clone's
    suite took 584 s so, 949 s with two threads per worker and per subprocess)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)


# Test modules by their share of the suite's time, longest first (`pytest --durations=0`, summed
# per module). `make test` hands whole modules to two workers in collection order
# (`--dist loadfile --no-loadscope-reorder`), so the long ones start first and the short ones
# fill the gaps at the end instead of one worker finishing a long module alone. The order
# affects only the wall time; modules not listed run after these, in pytest's order.
LONGEST_FIRST = (
    "test_studies", "test_deployments", "test_predict", "test_engine", "test_remote",
    "test_export", "test_gpu_check", "test_compare", "test_pipeline", "test_store_admin",
    "test_serve", "test_models", "test_speedups", "test_synthetic", "test_query", "test_cli",
)  # fmt: skip


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: test order kept


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> TinyData:
    """Train (48 images, 3 shards) and val (24 images) shards of four colour-blob classes.
    Read-only: a test that damages data does so on a copy."""
    return make_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    """A model trained one epoch on 32 images, with its 4 shards and source JPEGs. Read-only:
    tests that change a model directory copy it first (``copy_model``)."""
    return make_trained(tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """A private Prefect home and one test server for every flow test of the session."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def prefect_api(prefect_harness) -> str:
    """The test server's API URL: `lcm` subprocesses given it (``cli_env(tmp, api=...)``)
    skip starting a server of their own (~10 s each)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


@pytest.fixture(scope="module")
def one_thread():
    """Run on one intra-op thread: on a shared 2-core machine, OpenMP threads competing with
    other processes make small ops several times slower, not faster."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
