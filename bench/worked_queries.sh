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

ask() { echo; echo "-- $1"; echo "$2"; lcm query --db "$db" "$2"; }

ask "Top images for a label" \
"SELECT image_key, round(score, 3) AS score, predicted
FROM predictions_named WHERE run_id = 'raw' AND name = 'cup'
ORDER BY score DESC LIMIT 5"

ask "Label frequencies above threshold" \
"SELECT name, count(*) FILTER (WHERE predicted) AS images,
       round(avg(predicted::INT), 3) AS share, round(any_value(threshold), 3) AS threshold
FROM predictions_named WHERE run_id = 'raw'
GROUP BY name ORDER BY images DESC LIMIT 6"

ask "Label co-occurrence matrix (images where both are predicted)" \
"WITH p AS (SELECT image_key, name FROM predictions_named
           WHERE run_id = 'raw' AND predicted AND name IN ('kettle', 'cup', 'car', 'tyre'))
SELECT a.name AS label,
       count(*) FILTER (WHERE b.name = 'kettle') AS kettle, count(*) FILTER (WHERE b.name = 'cup') AS cup,
       count(*) FILTER (WHERE b.name = 'car') AS car, count(*) FILTER (WHERE b.name = 'tyre') AS tyre
FROM p a JOIN p b USING (image_key) GROUP BY a.name ORDER BY a.name"

ask "Two runs compared: raw against EMA weights" \
"SELECT a.name, count(*) FILTER (WHERE a.predicted <> b.predicted) AS verdicts_changed,
       round(avg(b.score - a.score), 4) AS mean_shift, round(max(abs(b.score - a.score)), 3) AS max_shift
FROM predictions_named a JOIN predictions_named b USING (image_key, label_id)
WHERE a.run_id = 'raw' AND b.run_id = 'ema'
GROUP BY a.name ORDER BY verdicts_changed DESC, a.name LIMIT 5"

ask "Precision and recall per label against the shards' labels (worst recall first)" \
"SELECT name,
       round(count(*) FILTER (WHERE predicted AND target = 1) / count(*) FILTER (WHERE predicted), 3) AS precision,
       round(count(*) FILTER (WHERE predicted AND target = 1) / count(*) FILTER (WHERE target = 1), 3) AS recall,
       count(*) FILTER (WHERE target = 1) AS positives
FROM scored WHERE run_id = 'raw' AND target >= 0
GROUP BY name ORDER BY recall, name LIMIT 5"
