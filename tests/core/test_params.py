"""Code tests for configuration: params.yaml and dvc.yaml stay in step with the code."""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from domaintune.core.errors import ParamsError
from domaintune.core.params import SECTIONS, load_all, parse_section

REPO = Path(__file__).resolve().parents[2]


def test_every_params_section_loads_into_its_dataclass():
    params = load_all(REPO / "params.yaml")
    assert set(params) == set(SECTIONS)
    for name, value in params.items():
        assert isinstance(value, SECTIONS[name]), name
        assert dataclasses.is_dataclass(value)


def test_params_yaml_sets_every_field_explicitly():
    # Defaults hidden in code are invisible to `dvc params diff`; params.yaml spells them out.
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, cls in SECTIONS.items():
        missing = {f.name for f in dataclasses.fields(cls)} - set(raw.get(name) or {})
        assert not missing, f"params.yaml section {name} does not set {sorted(missing)}"


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises(ParamsError, match=r"finetune: unknown key\(s\) \['lerning_rate'\]"):
        parse_section("finetune", {"lerning_rate": 1e-4})


@pytest.mark.parametrize(
    "section,raw,fragment",
    [
        ("finetune", {"method": "prompt"}, "finetune.method"),
        ("finetune", {"lora_r": 0}, "finetune.lora_r"),
        ("finetune", {"seeds": []}, "finetune.seeds"),
        ("finetune", {"lr": "fast"}, "finetune.lr: expected float"),
        ("ingest", {"split": {"train": 0.5, "validation": 0.1, "test": 0.1}}, "ingest.split"),
        ("audit", {"action": "delete"}, "audit.action"),
        ("audit", {"filter_by": "magic"}, "audit.filter_by"),
        ("base", {"max_length": 2}, "base.max_length"),
    ],
)
def test_bad_values_name_the_key(section, raw, fragment):
    with pytest.raises(ParamsError, match=fragment.replace(".", r"\.")):
        parse_section(section, raw)


def test_yaml_ints_are_accepted_for_float_fields():
    assert parse_section("finetune", {"lr": 1}).lr == 1.0


def test_every_dvc_stage_has_its_module_and_params_section():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert list(stages) == ["ingest", "dedupe", "audit", "dapt", "finetune", "evaluate", "export", "drift"]
    for name, stage in stages.items():
        assert stage["cmd"].startswith(f"python -m stages.{name} "), name
        module = importlib.import_module(f"stages.{name}")
        assert callable(module.main), name
        assert f"stages/{name}.py" in stage["deps"], name
        sections = {p.split(".")[0] for p in stage.get("params", []) if isinstance(p, str)}
        assert name in sections, f"stage {name} does not track its own params section"
        assert sections <= set(SECTIONS), f"stage {name} tracks unknown params {sections - set(SECTIONS)}"


# Keys whose params.yaml value is about the embedded example, not a general default.
EXAMPLE_SPECIFIC = {("ingest", "source"), ("ingest", "id_column"), ("ingest", "split"), ("audit", "action"),
                    ("dapt", "corpus"), ("export", "intended_use")}


def test_dataclass_defaults_are_the_shipped_params_yaml():
    """A key left out of params.yaml falls back to the dataclass default: that must be the same recipe."""
    from domaintune.core.params import as_dict

    shipped = yaml.safe_load((Path(__file__).resolve().parents[2] / "params.yaml").read_text())
    differ = []
    for section, cls in SECTIONS.items():
        defaults = as_dict(cls())
        for key, value in (shipped.get(section) or {}).items():
            if (section, key) not in EXAMPLE_SPECIFIC and as_dict(parse_section(section, {key: value}))[key] != defaults[key]:
                differ.append(f"{section}.{key}: params.yaml {value!r}, default {defaults[key]!r}")
    assert not differ, differ
