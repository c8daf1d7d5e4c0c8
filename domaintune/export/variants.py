"""The one list of export variants (light to import: the CLI's --variant choices read it).

export.variants is checked against it (by every stage, tasks.run_hook), domaintune/export/artifacts.py writes
and loads each one, and predict, serve and the model card offer them. Adding a variant is a name here and its
writer, loader and verification in domaintune/export/.
"""
from __future__ import annotations

import argparse

from domaintune.core.errors import ParamsError

VARIANTS = ("float32", "int8", "onnx", "onnx-int8", "openvino-int8")
ALIASES = {"float": "float32"}


def canonical_variant(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} ('float' = float32)")
    return name


def variant_arg(name: str) -> str:
    """argparse type of every --variant option: a variant's one name, the older spelling 'float' accepted."""
    try:
        return canonical_variant(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_variants(names) -> None:
    """export.variants names only known variants."""
    if not set(names) <= set(VARIANTS):
        raise ParamsError(f"params.yaml: export.variants: must be a non-empty list of {', '.join(VARIANTS)}, "
                          f"got {list(names)}")
