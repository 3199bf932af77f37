#!/usr/bin/env bash
# The README's worked queries, with the output they print. Run after `make demo`:
#   bash bench/worked_queries.sh
# Scores the demo's val shards twice (raw and EMA weights) into predictions/examples.duckdb,
# then asks the questions. Re-running skips the scoring: both runs are already complete.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" PREFECT_HOME="$PWD/.prefect" PREFECT_LOGGING_LEVEL=WARNING
export PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=120
db=predictions/examples.duckdb
for w in raw ema; do
  lcm batch-predict --checkpoint models/synth --shards data/shards/synth/val --db "$db" \
    --run-id "$w" --weights "$w"
done

# Each query of worked_queries.sql: its title, the SQL and what `lcm query` prints.
python - "$db" <<'PY'
import subprocess, sys
from pathlib import Path
text = Path("bench/worked_queries.sql").read_text()
for block in text.split("\n;\n")[:-1]:
    lines = [l for l in block.strip().splitlines() if l.strip()]
    title = [l for l in lines if l.startswith("-- ")][-1][3:]
    sql = "\n".join(l for l in lines if not l.startswith("--"))
    print(f"\n-- {title}\n{sql}", flush=True)
    subprocess.run(["lcm", "query", "--db", sys.argv[1], sql], check=True)
PY
