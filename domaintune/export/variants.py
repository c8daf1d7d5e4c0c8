"""The one list of export variants (light to import: the CLI's --variant choices read it).

export.variants is checked against it (by every stage, tasks.run_hook), domaintune/export/artifacts.py writes
and loads each one, and predict, serve and the model card offer them. Adding a variant is a name here and its
writer, loader and verification in domaintune/export/.

`auto` (the default of serve, predict and monitor) is no variant of its own: resolve_variant turns it into the
fastest variant that passed its gates, from the texts/s the export stage measured on its machine and recorded in
the export's export_report.json ("speed"); an export without that record resolves to float32, with a notice.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from domaintune.core.errors import ParamsError

VARIANTS = ("float32", "int8", "onnx", "onnx-int8", "openvino-int8")
ALIASES = {"float": "float32"}
AUTO = "auto"
REQUESTS = (AUTO, *VARIANTS)  # what --variant takes: a variant's name, or auto
EMBEDDING_VARIANTS = ("float32", "int8")  # the PyTorch variants: the only ones that return text embeddings
AUTO_MIN_GAIN = 1.10  # auto leaves float32 only for a variant measured at least this much faster: within timing
                      # noise of float32 a variant buys nothing and costs float32's exactness
REPORT = "export_report.json"  # the export stage's record in the export folder (its metrics, speeds included)
log = logging.getLogger("domaintune")


def canonical_variant(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {', '.join(VARIANTS)} ('float' = float32)")
    return name


def requested_variant(name: str) -> str:
    """A variant's one name, or auto (what --variant and ServeSettings.variant take)."""
    if name == AUTO:
        return AUTO
    try:
        return canonical_variant(name)
    except ValueError:
        raise ValueError(f"unknown variant {name!r}; choose auto or one of {', '.join(VARIANTS)} "
                         "('float' = float32)") from None


def variant_arg(name: str) -> str:
    """argparse type of every --variant option: auto or a variant's one name, the older spelling 'float' accepted."""
    try:
        return requested_variant(name)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class VariantChoice:
    """Which variant runs, and why: `note` is what /version, the logs and the model card print."""
    variant: str                     # the variant loaded (never auto)
    requested: str                   # what was asked for: auto or a variant's name
    texts_per_s: float | None = None  # its speed as the export stage measured it (None: not recorded)
    why: str = "fastest passing"     # auto: why this one

    @property
    def note(self) -> str:
        speed = "" if self.texts_per_s is None else f", {self.texts_per_s:,.0f} texts/s measured at export"
        if self.requested != AUTO:
            return f"{self.variant} (asked for{speed})"
        if self.texts_per_s is None:
            return f"{self.variant} (auto: no speeds recorded in the export)"
        return f"{self.variant} (auto: {self.why}{speed})"


def speed_record(folder: str | Path) -> dict | None:
    """The export stage's speed record of an export folder (export_report.json's "speed"), None without one."""
    path = Path(folder) / REPORT
    try:
        speed = json.loads(path.read_text(encoding="utf-8")).get("speed")
    except (OSError, ValueError, AttributeError):
        return None
    return speed if isinstance(speed, dict) and isinstance(speed.get("variants"), dict) else None


def fastest_passing(speed: dict, among=VARIANTS) -> tuple[str, float, str] | None:
    """(name, texts/s, why) of the fastest variant of a speed record that passed its gates and is one of `among`
    (exported variants only: the measured-only bf16 autocast row never is, nor a variant over its gates), float32
    unless that one is at least AUTO_MIN_GAIN times float32's texts/s."""
    ok = {}
    for name, row in speed["variants"].items():
        if name not in among or name not in VARIANTS or not isinstance(row, dict):
            continue
        if row.get("passed_gates") is not True:
            continue
        tps = row.get("texts_per_s")
        if isinstance(tps, (int, float)) and not isinstance(tps, bool) and tps > 0:
            ok[name] = float(tps)
    if not ok:
        return None
    best = max(ok, key=lambda k: (ok[k], k == "float32"))
    if best != "float32" and "float32" in ok and ok[best] < AUTO_MIN_GAIN * ok["float32"]:
        return "float32", ok["float32"], (f"no passing variant measured {AUTO_MIN_GAIN:.2f}x float32's texts/s "
                                          f"(fastest: {best}, {ok[best]:,.0f})")
    return best, ok[best], "fastest passing"


def resolve_variant(folder: str | Path, requested: str = AUTO, among=VARIANTS) -> VariantChoice:
    """The variant to load from an export folder: a named one as asked; auto the fastest that passed its gates
    (fastest_passing, among the variants in `among`, e.g. EMBEDDING_VARIANTS where embeddings are needed), or
    float32, with a one-line notice, when the export recorded no speeds (exported before they were measured)."""
    requested = requested_variant(requested)
    speed = speed_record(folder)
    rows = (speed or {}).get("variants", {})
    if requested != AUTO:
        tps = (rows.get(requested) or {}).get("texts_per_s") if isinstance(rows.get(requested), dict) else None
        return VariantChoice(requested, requested, tps)
    best = fastest_passing(speed, among) if speed else None
    if best is None:
        if speed is None:
            log.warning("%s: no variant speeds recorded (exported before domaintune measured them, or not an export "
                        "stage's folder): --variant auto runs float32; re-run the export stage to measure them", folder)
        else:
            log.warning("%s: no measured variant among %s passed its gates: --variant auto runs float32",
                        folder, ", ".join(among))
        tps = rows.get("float32", {}).get("texts_per_s") if isinstance(rows.get("float32"), dict) else None
        return VariantChoice("float32", AUTO, tps if speed else None)
    return VariantChoice(best[0], AUTO, best[1], best[2])


def check_variants(names) -> None:
    """export.variants names only known variants."""
    if not set(names) <= set(VARIANTS):
        raise ParamsError(f"params.yaml: export.variants: must be a non-empty list of {', '.join(VARIANTS)}, "
                          f"got {list(names)}")
