"""Tests for llmlab.config: strict dict/YAML <-> dataclass conversion, overrides and help rows."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from llmlab.common import LlmlabError
from llmlab.config import (ConfigError, apply_overrides, config_help, from_dict, load_config,
                           save_config, to_dict)


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    kind: Literal["adamw", "sgd"] = "adamw"
    clip: Optional[float] = None

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class GptModel:
    family: Literal["gpt"] = "gpt"
    dim: int = 64
    tie_embeddings: bool = True


@dataclass
class LlamaModel:
    family: Literal["llama"] = "llama"
    dim: int = 32
    rope_theta: float = 10000.0


@dataclass
class Train:
    steps: int  # required: no default
    name: str = "run"
    optim: Optim = field(default_factory=Optim)
    model: GptModel | LlamaModel = field(default_factory=GptModel)
    eval_at: tuple[int, ...] = (10, 20)
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    seed: int | None = None


def _error(cls, data, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        from_dict(cls, data, **kwargs)
    return str(info.value)


def test_round_trip_through_dict():
    cfg = Train(steps=5, name="x", optim=Optim(lr=3e-4, betas=(0.8, 0.9), kind="sgd", clip=1.0),
                model=LlamaModel(dim=16), eval_at=(1, 2, 3), tags=["a"], weights={"web": 0.5}, seed=7)
    data = to_dict(cfg)
    assert data["eval_at"] == [1, 2, 3] and data["optim"]["betas"] == [0.8, 0.9]
    assert from_dict(Train, data) == cfg


def test_defaults_fill_missing_keys():
    cfg = from_dict(Train, {"steps": 3})
    assert cfg == Train(steps=3)
    assert isinstance(cfg.optim, Optim) and isinstance(cfg.eval_at, tuple)


def test_yaml_file_plus_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 10\noptim:\n  lr: 0.01\n  kind: sgd\n")
    cfg = load_config(Train, path, ["optim.lr=0.5", "model.family=llama", "model.dim=8", "tags=[x, y]"])
    assert cfg.steps == 10 and cfg.optim.kind == "sgd"
    assert cfg.optim.lr == 0.5  # override wins over the file
    assert cfg.model == LlamaModel(dim=8)
    assert cfg.tags == ["x", "y"]


def test_apply_overrides_creates_nested_dicts_and_parses_yaml():
    data = {"a": {"b": 1}, "n": None}
    out = apply_overrides(data, ["a.c.d=3", "flag=true", "xs=[1,2]", "a.b=null", "s=adamw", "n.k=1"])
    assert out == {"a": {"b": None, "c": {"d": 3}}, "flag": True, "xs": [1, 2], "s": "adamw", "n": {"k": 1}}
    assert data == {"a": {"b": 1}, "n": None}  # input untouched


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "a..b=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, [bad])


def test_override_through_a_scalar_is_an_error():
    with pytest.raises(ConfigError, match="'steps' holds 3"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_unknown_key_names_path_and_suggests():
    message = _error(Train, {"steps": 1, "optim": {"lrr": 0.1}}, source="run.yaml")
    assert message.startswith("run.yaml: optim.lrr: unknown key")
    assert "did you mean 'lr'?" in message
    assert "lr, betas, kind, clip" in message


def test_unknown_override_key_blames_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 1\n")
    with pytest.raises(ConfigError, match=r"^command line: optim\.lrr: unknown key"):
        load_config(Train, path, ["optim.lrr=1"])
    path.write_text("steps: 1\nsede: 3\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: sede: unknown key \(did you mean 'seed'\?\)"):
        load_config(Train, path, ["optim.lr=1"])


def test_wrong_type_names_path_expected_and_got():
    message = _error(Train, {"steps": 1, "optim": {"betas": [0.9, "x"]}})
    assert message == "optim.betas[1]: expected float, got 'x' (str)"
    assert _error(Train, {"steps": 1, "name": 3}) == "name: expected str, got 3 (int)"
    assert "expected tuple[float, float] (2 items)" in _error(Train, {"steps": 1, "optim": {"betas": [1.0]}})
    assert "expected a mapping for Optim" in _error(Train, {"steps": 1, "optim": 3})
    assert "weights.web: expected float" in _error(Train, {"steps": 1, "weights": {"web": "lots"}})


def test_literal_error_lists_allowed_values():
    message = _error(Train, {"steps": 1, "optim": {"kind": "adam"}})
    assert message.startswith("optim.kind: expected one of 'adamw', 'sgd', got 'adam'")
    assert "did you mean 'adamw'?" in message


def test_float_accepts_ints_and_yaml11_exponent_strings():
    cfg = from_dict(Train, {"steps": 1, "optim": {"lr": "3e-4", "clip": 1}})
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.clip == 1.0 and isinstance(cfg.optim.clip, float)
    assert "expected float" in _error(Train, {"steps": 1, "optim": {"lr": True}})


def test_bool_is_strict():
    assert "expected bool, got 1 (int)" in _error(GptModel, {"tie_embeddings": 1})
    assert "expected bool, got 'yes' (str)" in _error(GptModel, {"tie_embeddings": "yes"})


@pytest.mark.parametrize("value", [1.5, 4.0, True, "1e6", "3"])
def test_int_is_strict(value):
    assert _error(Train, {"steps": value}).startswith("steps: expected int, got ")


def test_optional_accepts_none_and_checks_the_inner_type():
    assert from_dict(Train, {"steps": 1, "seed": None}).seed is None
    assert "seed: expected int | None, got 'x' (str)" == _error(Train, {"steps": 1, "seed": "x"})


def test_missing_required_field():
    assert _error(Train, {}) == "steps: missing required key (int)"


def test_post_init_value_error_gets_the_path():
    assert _error(Train, {"steps": 1, "optim": {"lr": -1}}, source="x.yaml") == \
        "x.yaml: optim: lr must be positive, got -1.0"


def test_union_discriminated_by_family():
    assert from_dict(Train, {"steps": 1, "model": {"family": "gpt", "dim": 8}}).model == GptModel(dim=8)
    assert from_dict(Train, {"steps": 1, "model": {"family": "llama"}}).model == LlamaModel()
    # a key of the other family is unknown here
    assert "model.rope_theta: unknown key" in _error(Train, {"steps": 1, "model": {"family": "gpt",
                                                                                    "rope_theta": 1.0}})
    message = _error(Train, {"steps": 1, "model": {"family": "lama"}})
    assert message.startswith("model.family: unknown family 'lama'; expected one of 'gpt', 'llama'")
    assert "unknown family [1]" in _error(Train, {"steps": 1, "model": {"family": [1]}})  # unhashable
    # a union with no default to complete a partial mapping from
    assert "missing key 'family'; expected one of 'gpt', 'llama'" in \
        str(pytest.raises(ConfigError, from_dict, GptModel | LlamaModel, {"dim": 3}).value)


@dataclass
class Wide:
    family: Literal["wide"] = "wide"
    dim: int = 8
    heads: int = 2
    head_dim: int | None = None  # derived: dim // heads

    def __post_init__(self):
        self.head_dim = self.head_dim or self.dim // self.heads


@dataclass
class Run:
    model: Wide | LlamaModel = field(default_factory=lambda: Wide(dim=16, heads=4))
    optim: Optim = field(default_factory=lambda: Optim(lr=0.5, kind="sgd"))


def test_a_partial_mapping_completes_the_fields_default():
    # the default's family and settings stay; a field derived from others is derived again
    assert from_dict(Run, {"model": {"dim": 32}}).model == Wide(dim=32, heads=4, head_dim=8)
    assert from_dict(Run, {"model": {"head_dim": 3}}).model == Wide(dim=16, heads=4, head_dim=3)
    assert from_dict(Run, {"optim": {"clip": 1.0}}).optim == Optim(lr=0.5, kind="sgd", clip=1.0)
    # naming another family starts from that family's defaults
    assert from_dict(Run, {"model": {"family": "llama", "dim": 4}}).model == LlamaModel(dim=4)
    assert from_dict(Run, {"model": {"family": "wide"}}).model == Wide(dim=16, heads=4)


def test_non_finite_numbers_are_refused():
    for value in (float("nan"), float("inf"), "-inf", "1e999"):
        assert "optim.lr: expected a finite number" in _error(Train, {"steps": 1, "optim": {"lr": value}})


def test_from_dict_accepts_a_top_level_union():
    assert from_dict(GptModel | LlamaModel, {"family": "llama", "dim": 4}) == LlamaModel(dim=4)


def test_config_error_is_an_llmlab_error():
    assert issubclass(ConfigError, LlmlabError)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(Train, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 1\noptim:\n  lr: [1, 2\n  kind: sgd\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+") as info:
        load_config(Train, bad)
    assert "line 4" in str(info.value) or "line 5" in str(info.value)
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping, got list"):
        load_config(Train, listed)


def test_empty_file_and_no_file_mean_defaults(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(GptModel, empty) == GptModel()
    assert load_config(GptModel) == GptModel()
    assert load_config(Train, None, ["steps=2"]) == Train(steps=2)


def test_save_then_load_round_trip_leaves_no_temp_file(tmp_path):
    cfg = Train(steps=5, optim=Optim(lr=3e-4, clip=0.5), model=LlamaModel(rope_theta=1e-10),
                eval_at=(5,), weights={"a": 1.0})
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(Train, path) == cfg
    assert os.listdir(path.parent) == ["config.yaml"]
    save_config(dataclasses.replace(cfg, steps=6), path)  # overwrite in place
    assert load_config(Train, path).steps == 6
    assert os.listdir(path.parent) == ["config.yaml"]


def test_config_help_lists_dotted_leaf_keys():
    rows = {key: (type_name, default) for key, type_name, default, _ in config_help(Train)}
    assert rows["steps"] == ("int", "required")
    assert rows["optim.lr"] == ("float", "0.001")
    assert rows["optim.betas"] == ("tuple[float, float]", "(0.9, 0.95)")
    assert rows["optim.kind"] == ("'adamw' | 'sgd'", "'adamw'")
    assert rows["optim.clip"] == ("float | None", "None")
    assert rows["model.family"] == ("'gpt' | 'llama'", "'gpt'")
    assert rows["model.dim"] == ("int", "64")  # from the default member, GptModel
    assert rows["model.rope_theta"] == ("float", "10000.0")
    assert rows["eval_at"] == ("tuple[int, ...]", "(10, 20)")
    assert "optim" not in rows and "model" not in rows  # leaves only
    assert len(rows) == 14


@dataclass
class Lora:
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")


@dataclass
class Finetune:
    lora: Optional[Lora] = None
    base: Train = field(default_factory=lambda: Train(steps=100, model=LlamaModel()))


def test_optional_dataclass_and_factory_defaults():
    assert from_dict(Finetune, {}).lora is None
    assert load_config(Finetune, None, ["lora.rank=4"]).lora == Lora(rank=4)
    assert to_dict(Finetune(lora=Lora()))["lora"] == {"rank": 8, "targets": ["q_proj", "v_proj"]}
    rows = {key: (type_name, default) for key, type_name, default, _ in config_help(Finetune)}
    assert rows["lora"] == ("Lora | None", "None")  # so help shows it is off by default
    assert rows["lora.rank"] == ("int", "8")
    # defaults come from the factory's instance, not from Train's own field defaults
    assert rows["base.steps"] == ("int", "100")
    assert rows["base.model.family"] == ("'gpt' | 'llama'", "'llama'")
    assert rows["base.model.dim"] == ("int", "32")


@dataclass
class Derived:
    groups: Literal[1, 2] = 1
    width: int = field(init=False)  # computed, so never read from or written to a config

    def __post_init__(self):
        self.width = 64 * self.groups


def test_literal_compares_types_and_init_false_fields_are_skipped():
    assert "expected one of 1, 2, got True (bool)" in _error(Derived, {"groups": True})
    cfg = from_dict(Derived, {"groups": 2})
    assert cfg.width == 128 and to_dict(cfg) == {"groups": 2}
    assert from_dict(Derived, to_dict(cfg)) == cfg
    assert [row[0] for row in config_help(Derived)] == ["groups"]
    assert "width: unknown key" in _error(Derived, {"width": 3})


@dataclass
class Commented:
    marker: str = "#"  # the comment, not the "#" in the default
    plain: int = 1
    spread: tuple[int, ...] = field(default_factory=lambda: (  # a factory over two lines
        1, 2))


def test_config_help_carries_each_field_comment():
    rows = {key: comment for key, _, _, comment in config_help(Commented)}
    assert rows == {"marker": 'the comment, not the "#" in the default', "plain": "",
                    "spread": "a factory over two lines"}
