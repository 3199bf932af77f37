"""lcm/io.py: atomic writes leave the old file or the new one, never half of one; JSON reads
name the file and the problem."""

from __future__ import annotations

import os
import stat

import pytest

from lcm.errors import CheckpointError, DataError
from lcm.io import atomic_path, atomic_write_json, atomic_write_text, read_json


def test_atomic_write_replaces_and_an_error_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
    atomic_write_text(path, "new")
    assert path.read_text() == "new"


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(path, {"a": 1})
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask  # not mkstemp's private 0600
    path.chmod(0o640)
    atomic_write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and read_json(path) == {"a": 2}


def test_read_json_names_the_file_and_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"nope\.json: run the stage first"):
        read_json(tmp_path / "nope.json", "run the stage first")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=r"bad\.json: not valid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_json(bad, error=CheckpointError)
