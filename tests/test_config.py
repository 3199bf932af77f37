from pathlib import Path

import pytest

from lcm.config import Params, load_params, load_params_with, params_from_dict, to_dict
from lcm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_repo_params_load_and_round_trip():
    params = load_params(ROOT / "params.yaml")
    assert params.model.arch == "lcm"
    assert params_from_dict(to_dict(params)) == params


def test_missing_file_gives_defaults(tmp_path):
    assert load_params(tmp_path / "nope.yaml") == Params()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("train:\n  epochz: 3\n", "unknown key 'epochz'"),
        ("bogus:\n  a: 1\n", "unknown key 'bogus'"),
        ("train:\n  epochs: three\n", "train.epochs: expected an integer"),
        ("train:\n  epochs: true\n", "train.epochs: expected an integer"),
        ("model:\n  arch: resnet\n", "model.arch: 'resnet' is not one of"),
        ("train:\n  lr: [1]\n", "train.lr: expected a number"),
        ("mask:\n  missing: 0.5\n", "mask.missing: expected a list"),
        ("train: 3\n", "train: expected a mapping"),
        ("train: [\n", "not valid YAML"),
        ("data:\n  format: yolo\n", "data.format: 'yolo' is not one of"),
        ("data:\n  splits:\n    val: {name: test}\n", "data.splits.val: missing key 'images'"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path, text, fragment):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert fragment in str(e.value)
    assert str(path) in str(e.value)


def test_overrides_are_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  epochs: 3\n")
    params = load_params_with(path, ["train.epochs=5", "model.arch=gap", "train.missing=0.5"])
    assert (params.train.epochs, params.model.arch, params.train.missing) == (5, "gap", 0.5)
    assert params.train.lr == Params().train.lr
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_params_with(path, ["train.epoch=5"])
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        load_params_with(path, ["epochs=5"])


def test_int_accepted_where_float_expected():
    params = params_from_dict({"train": {"lr": 1}, "model": {"pretrained": "w.safetensors"}})
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)
    assert params.model.pretrained == "w.safetensors"


def test_e_notation_is_a_number(tmp_path):
    """PyYAML (YAML 1.1) reads 5e-4 as a string; a float field takes it as the number."""
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 5e-4\n  weight_decay: 1E+2\n")
    params = load_params(path)
    assert params.train.lr == 5e-4 and params.train.weight_decay == 100.0
    assert load_params_with(path, ["train.lr=3e-3"]).train.lr == 3e-3
    for bad in ("5e", "e-4", "fast", "5e-4x"):
        path.write_text(f"train:\n  lr: {bad}\n")
        with pytest.raises(ConfigError, match="train.lr: expected a number"):
            load_params(path)
    path.write_text("train:\n  epochs: 1e2\n")  # an integer field does not take it
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        load_params(path)
