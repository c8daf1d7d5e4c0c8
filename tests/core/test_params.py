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
        ("export", {"calibration_rows": 0}, "export.calibration_rows: must be a whole number >= 1"),
        ("export", {"calibration_rows": "all"}, "export.calibration_rows"),
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


# ---- overrides as users type them (`-S section.key=value`) and minimal writes ---------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from domaintune.core.params import apply_overrides, parse_overrides, read_params_file  # noqa: E402

SHIPPED = Path(__file__).resolve().parents[2] / "params.yaml"


@pytest.mark.parametrize("typed", ["2e-5", "2.0e-5", "0.00002", "2E-05", "1e-4", "3.0e-4"])
def test_small_learning_rates_set_by_override_load_as_floats(tmp_path, typed):
    params = tmp_path / "params.yaml"
    params.write_bytes(SHIPPED.read_bytes())
    apply_overrides(params, parse_overrides([f"finetune.lr={typed}"]))
    assert load_all(params)["finetune"].lr == pytest.approx(float(typed))
    assert f"lr: {typed}" in params.read_text()  # written as typed


def test_params_yaml_floats_in_exponent_form_load_as_floats(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(SHIPPED.read_text().replace("lr: 1.0e-4 ", "lr: 2e-5   "))
    assert load_all(params)["finetune"].lr == pytest.approx(2e-5)


def test_an_override_changes_only_its_own_line(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(SHIPPED.read_bytes())
    before = SHIPPED.read_text().splitlines()
    apply_overrides(params, parse_overrides(["finetune.lr=2e-5", "dapt.epochs=2"]))
    after = params.read_text().splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == ["epochs: 2", "lr: 2e-5"]
    assert "null" in SHIPPED.read_text() and after.count("") == before.count("")


def _override_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_override_text(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


FIELDS = {  # one field of each declared type, with values of that type
    "finetune.lr": st.floats(min_value=1e-12, max_value=10, allow_nan=False).map(float),
    "finetune.epochs": st.integers(min_value=1, max_value=10**6),
    "dapt.epochs": st.one_of(st.none(), st.integers(min_value=1, max_value=1000)),
    "finetune.target_modules": st.lists(st.sampled_from(["query", "key", "value", "dense"]), min_size=1,
                                        max_size=4, unique=True),
}


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_override_round_trip_is_exact_for_every_type(tmp_path_factory, data):
    """override text -> params.yaml -> typed params gives back the value typed, for floats (any exponent),
    ints, nulls and lists; booleans through a bool field."""
    key = data.draw(st.sampled_from(sorted(FIELDS)))
    value = data.draw(FIELDS[key])
    section, name = key.split(".")
    params = tmp_path_factory.mktemp("p") / "params.yaml"
    params.write_bytes(SHIPPED.read_bytes())
    apply_overrides(params, parse_overrides([f"{key}={_override_text(value)}"]))
    got = getattr(load_all(params)[section], name)
    assert (list(got) if isinstance(got, tuple) else got) == value
    assert read_params_file(params)[section][name] == value


def test_bool_overrides_round_trip(tmp_path):
    params = tmp_path / "params.yaml"
    bools = [(s, f.name) for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.type in (bool, "bool")]
    assert bools
    section, name = bools[0]
    for text, want in (("true", True), ("false", False)):
        params.write_bytes(SHIPPED.read_bytes())
        apply_overrides(params, parse_overrides([f"{section}.{name}={text}"]))
        assert getattr(load_all(params)[section], name) is want


def test_a_bad_override_leaves_params_yaml_unchanged(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(SHIPPED.read_bytes())
    with pytest.raises(ParamsError, match="finetune.lr"):
        apply_overrides(params, parse_overrides(["finetune.lr=fast"]))
    assert params.read_bytes() == SHIPPED.read_bytes()
