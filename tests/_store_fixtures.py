"""Prediction stores built straight through the store's write path (no model): runs of
synthetic scores, registered shard by shard and completed with their summaries."""

from __future__ import annotations

import gzip
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from lcm import store
from lcm.predict import part_table, write_part
from lcm.summaries import summarize

FIXTURES = Path(__file__).parent / "fixtures"
LABELS = [("cat", 0.5), ("dog", 0.3), ("car", 0.7)]


def add_run(
    db: Path,
    run_id: str,
    *,
    n_shards: int = 3,
    per_shard: int = 4,
    seed: int = 0,
    run_date: date | None = None,
    finish: bool = True,
    source: str = "s",
    model: str = "sha256:m",
) -> dict:
    """Create, fill and (``finish``) complete one run; returns its catalog row."""
    rng = np.random.default_rng(seed)
    record = store.RunRecord(run_id, "model", model, "raw", "shards", source, f"sha256:{run_id}",
                             n_shards, 32, {}, "test", None, run_date)  # fmt: skip
    with store.writer(db, 10) as con:
        ordinal, _ = store.create_run(con, record, LABELS, "default 0.5")
        root = store.data_root_of(con, db)
    for s in range(n_shards):
        keys = [f"{run_id}-{s}-{i}" for i in range(per_shard)]
        scores = [rng.random((per_shard, len(LABELS)), dtype=np.float32)]
        targets = [rng.integers(-1, 2, (per_shard, len(LABELS))).astype(np.float32)]
        table = part_table(run_id, f"shard-{s}", keys, scores, targets, len(LABELS))
        path = store.run_dir(root, run_id, ordinal) / f"part-shard-{s}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_part(path, table)
        part = store.PartRecord(run_id, f"shard-{s}", str(path), per_shard, (), table.num_rows,
                                "w", 0.0)  # fmt: skip
        with store.writer(db, 10) as con:
            store.register_parts(con, [part], root)
    with store.writer(db, 10) as con:
        if finish:
            files = [root / p for (p,) in con.execute(
                "SELECT part FROM run_shards WHERE run_id = ? ORDER BY shard", [run_id]
            ).fetchall()]  # fmt: skip
            sums = summarize(run_id, files, np.array([t for _, t in LABELS]))
            store.finish_run(con, run_id, sums)
        return store.get_run(con, run_id)


def nightly_store(db: Path, nights: int, **kw) -> list[dict]:
    start = date(2026, 1, 1)
    return [add_run(db, f"night-{n:03d}", seed=n, run_date=start + timedelta(days=n), **kw)
            for n in range(nights)]  # fmt: skip


def v1_store(dest: Path) -> Path:
    """The schema-1 store written by commit b812aed (tests/fixtures/README.md)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(gzip.decompress((FIXTURES / "store-v1.duckdb.gz").read_bytes()))
    return dest


def worked_queries(root: Path) -> list[tuple[str, str]]:
    """(title, SQL) of the README's worked queries (bench/worked_queries.sql)."""
    text = (root / "bench" / "worked_queries.sql").read_text()
    out = []
    for block in text.split("\n;\n")[:-1]:
        lines = [line for line in block.strip().splitlines() if line.strip()]
        title = [line for line in lines if line.startswith("-- ")][-1][3:]
        out.append((title, "\n".join(line for line in lines if not line.startswith("--"))))
    return out
