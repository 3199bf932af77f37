"""The paper's studies on our benchmark (``lcm ablate``; README "Studies").

- :mod:`lcm.studies.grids`: the five studies, their grids and the paper's findings; profiles;
- :mod:`lcm.studies.inmemory`: one run, trained and scored on a tier held in memory;
- :mod:`lcm.studies.results`: the append-only run log and the CSV / DuckDB results table;
- :mod:`lcm.studies.report`: the trend fit, the figure and the markdown table of a study.

:mod:`flows.ablate` runs a study's grid as Prefect tasks, one per run.
"""
