-- The README's worked queries (bench/worked_queries.sh asks them of the demo's store).
-- Each: a title line starting with '-- ', the query, a line with ';'.

-- Top images for a label
SELECT image_key, round(score, 3) AS score, predicted
FROM predictions_named WHERE run_id = 'raw' AND name = 'cup'
ORDER BY score DESC, image_key LIMIT 5
;

-- Label frequencies above threshold
SELECT name, count(*) FILTER (WHERE predicted) AS images,
       round(avg(predicted::INT), 3) AS share, round(any_value(threshold), 3) AS threshold
FROM predictions_named WHERE run_id = 'raw'
GROUP BY name ORDER BY images DESC, name LIMIT 6
;

-- Label co-occurrence matrix (images where both are predicted)
WITH p AS (SELECT image_key, name FROM predictions_named
           WHERE run_id = 'raw' AND predicted AND name IN ('kettle', 'cup', 'car', 'tyre'))
SELECT a.name AS label,
       count(*) FILTER (WHERE b.name = 'kettle') AS kettle, count(*) FILTER (WHERE b.name = 'cup') AS cup,
       count(*) FILTER (WHERE b.name = 'car') AS car, count(*) FILTER (WHERE b.name = 'tyre') AS tyre
FROM p a JOIN p b USING (image_key) GROUP BY a.name ORDER BY a.name
;

-- Two runs compared: raw against EMA weights
SELECT a.name, count(*) FILTER (WHERE a.predicted <> b.predicted) AS verdicts_changed,
       round(avg(b.score - a.score), 4) AS mean_shift, round(max(abs(b.score - a.score)), 3) AS max_shift
FROM predictions_named a JOIN predictions_named b USING (image_key, label_id)
WHERE a.run_id = 'raw' AND b.run_id = 'ema'
GROUP BY a.name ORDER BY verdicts_changed DESC, a.name LIMIT 5
;

-- Precision and recall per label against the shards' labels (worst recall first)
SELECT name,
       round(count(*) FILTER (WHERE predicted AND target = 1) / count(*) FILTER (WHERE predicted), 3) AS precision,
       round(count(*) FILTER (WHERE predicted AND target = 1) / count(*) FILTER (WHERE target = 1), 3) AS recall,
       count(*) FILTER (WHERE target = 1) AS positives
FROM scored WHERE run_id = 'raw' AND target >= 0
GROUP BY name ORDER BY recall, name LIMIT 5
;
