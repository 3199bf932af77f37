# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Project-local state for DVC and Prefect (never in folders DVC stages depend on).
export DVC_SITE_CACHE_DIR := $(CURDIR)/.dvc/site-cache
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_LOGGING_LEVEL := WARNING
export DVC_NO_ANALYTICS := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test test-fast lint format bench clean-demo studies pictures pictures-v1s pictures-v5s docs

# Byte-compiled on every core after the install instead of one file at a time by pip (27 s
# instead of 46 s on 2 cores). Compiled here, not lazily at first import: PYTHONDONTWRITEBYTECODE
# may be set, and the test processes compiling at once cost more than this. A few files of the
# dependencies are for newer Pythons and do not compile, as under pip: hence `|| true`.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (or: make PYTHON=python3 ...)"; exit 1; }
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@echo "pip install -e '.[dev]' into $(VENV): its output goes to $(VENV)/install.log, shown on failure"
	@{ $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q --no-compile -e '.[dev]'; } \
		>$(VENV)/install.log 2>&1 || { tail -n 60 $(VENV)/install.log; echo "install failed (log: $(VENV)/install.log)"; exit 1; }
	$(BIN)/python -m compileall -q -q -j 0 $(VENV)/lib >/dev/null || true
	touch $(STAMP)

# The demo's closing question to the prediction store (README: more worked queries): how
# well the batch predictions find the five most common labels of the val split.
DEMO_SQL := SELECT s.name AS label, count(*) FILTER (WHERE s.target = 1) AS positives, count(*) FILTER (WHERE s.predicted) AS predicted, round(count(*) FILTER (WHERE s.predicted AND s.target = 1) / nullif(count(*) FILTER (WHERE s.predicted), 0), 2) AS precision, round(count(*) FILTER (WHERE s.predicted AND s.target = 1) / count(*) FILTER (WHERE s.target = 1), 2) AS recall, any_value(CASE WHEN l.threshold_source LIKE '%no skill%' THEN '0.5: not learned' ELSE 'F1-optimal' END) AS threshold FROM scored s JOIN labels l USING (run_id, label_id) WHERE s.target >= 0 GROUP BY s.name ORDER BY positives DESC, label LIMIT 5

demo: $(STAMP)
	$(BIN)/dvc repro
	@$(BIN)/lcm summary
	@echo "precision and recall of the five most common val labels, from the batch predictions (threshold: how each label decides):"
	@$(BIN)/lcm query --db predictions/synth.duckdb "$(DEMO_SQL)"

# Two workers (pytest-xdist), a test module to a worker: most tests wait on subprocesses,
# servers and disk, so two at a time finish sooner even on two cores. Modules go out in
# collection order, longest first (tests/conftest.py), not xdist's most-tests-first.
# Only the pytest plugins the suite uses: the ones other packages install (hydra, anyio,
# platformdirs) are not imported, so a broken or changed one cannot stop the suite at start.
XDIST := -n 2 --dist loadfile --no-loadscope-reorder
PLUGINS := -p xdist -p timeout -p hypothesispytest
test test-fast: export PYTEST_DISABLE_PLUGIN_AUTOLOAD := 1
test: $(STAMP)
	$(BIN)/python -m pytest -q $(PLUGINS) $(XDIST) --durations=15

# Everything but the end-to-end tests marked slow (services, subprocesses, SIGKILL, DDP).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(PLUGINS) $(XDIST) -m "not slow"

# The documentation site (docs/, mkdocs.yml) into site/; --strict: a broken link or a missing
# page fails. The CLI reference is generated from the Typer app by docs/hooks.py.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet

# ruff, and the import layers of pyproject.toml's [tool.importlinter] (no circles, no
# upward imports, no Prefect/Typer/DVC in lcm/).
lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python bench/bench_data.py
	$(BIN)/python bench/bench_model.py

# README "Studies": the five studies' quick grids (each under an hour on 2 idle cores; finished
# points are kept, so a rerun only redraws), then the two pictures.
studies: $(STAMP)
	for s in depth mask-ratio alpha beta partial; do $(BIN)/lcm ablate --study $$s --grid quick || exit 1; done

# The pictures' model: LCM trained on the interaction tier at 128 px (4 x 4 maps); its
# attention maps, t-SNE and anchor reach. `make pictures-v1s` / `make pictures-v5s`: the same
# of the redesigns lcm_v1s and lcm_v5s_a0 (lcm_v5s trained with loss.alpha 0).
PIC := studies/data/pictures
PIC_MODEL := $(PIC)/model
PIC_OUT := studies/pictures
PIC_SET :=
V1S_SET := --set model.context_read=attend --set model.readout=context \
  --set model.token_norm=true --set model.embed_init=1.0 --set model.prototype_score=cosine \
  --set model.ffn=192
V5S_SET := $(subst context_read=attend ,context_read=attend_map ,$(V1S_SET)) --set loss.alpha=0
pictures: $(STAMP)
	$(BIN)/lcm data synth $(PIC)/raw --tier interaction --n-train 1000 --n-val 200
	for s in train val; do \
	  $(BIN)/lcm data prepare coco --root $(PIC)/raw --split $$s --out $(PIC)/prepared/$$s && \
	  $(BIN)/lcm data shard --prepared $(PIC)/prepared/$$s --images $(PIC)/raw/images/$$s \
	    --out $(PIC)/shards/$$s --max-side 128 || exit 1; done
	$(BIN)/lcm train --shards $(PIC)/shards/train --val-shards $(PIC)/shards/val --out $(PIC_MODEL) \
	  --no-live --set train.image_size=128 --set train.epochs=20 $(PIC_SET)
	$(BIN)/lcm visualize attention --checkpoint $(PIC_MODEL) --out $(PIC_OUT)/attention.png \
	  --image $(PIC)/raw/images/val/000000001041.jpg --labels mouse,stapler,car,monitor
	$(BIN)/lcm visualize tsne --checkpoint $(PIC_MODEL) --shards $(PIC)/shards/val \
	  --out $(PIC_OUT)/tsne.png
	$(BIN)/lcm visualize reach --checkpoint $(PIC_MODEL) --raw $(PIC)/raw --out $(PIC_OUT)/reach.md

pictures-v1s:
	$(MAKE) pictures PIC_MODEL=$(PIC)/model-v1s PIC_OUT=studies/pictures/lcm_v1s PIC_SET="$(V1S_SET)"
pictures-v5s:
	$(MAKE) pictures PIC_MODEL=$(PIC)/model-v5s PIC_OUT=studies/pictures/lcm_v5s_a0 PIC_SET="$(V5S_SET)"
