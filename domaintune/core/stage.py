"""What every stage's command line shares: argument parsing and error reporting.

A stage fails on bad input with one line that names the file, row and field
(DataError) or the params key (ParamsError), and a non-zero exit code, instead
of a traceback; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import yaml

from domaintune.core.errors import DataError, ParamsError, StageError
from domaintune.core.io import check_replaceable, claimed_outputs

# Command-line destinations that name what a stage writes; every other string argument
# (--in, --source, --params, --model, --decisions, ...) is read.
OUTPUT_ARGS = ("out", "metrics", "report", "embeddings", "checkpoints", "live", "extra_rows")
# Those written whole by atomic_output (an existing folder there is replaced); --checkpoints is a folder of
# checkpoint folders, each written whole.
REPLACED_ARGS = ("out", "metrics", "report", "embeddings", "live", "extra_rows")
HOW = "an output must not be, contain or sit inside another path the stage uses (writing it would replace that path)"


def _flag(dest: str) -> str:
    return "--in" if dest == "in_dir" else "--" + dest.replace("_", "-")


def _overlap(a: Path, b: Path) -> str | None:
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_apart(paths: dict[str, str], outputs: Sequence[str], replaced: Sequence[str] = (),
                how: str = HOW) -> None:
    """The one check of output paths, for the stages and the CLI commands alike, before anything is read or
    written. `paths`: every path the command uses, by the name the user knows it by (e.g. "--out"), in the
    order to check them; `outputs`: which of them are written, in priority order (the others are read);
    `replaced`: the outputs written whole (atomic_output). Refuses (StageError, one line) an output that is,
    contains or sits inside another path used (an input, or an output after it in `outputs`): writing it would
    replace or alter that path; and (DataError) a `replaced` output that is an existing folder domaintune does
    not own (core.io.check_replaceable). Paths compare after symbolic links are resolved."""
    real = {k: Path(os.path.realpath(v)) for k, v in paths.items()}
    outs = [k for k in outputs if k in real]
    for o in outs:
        for other in paths:
            if other == o or (other in outs and outs.index(other) < outs.index(o)):
                continue
            found = _overlap(real[o], real[other])
            if found:
                kind = "output" if other in outs else "input"
                raise StageError(f"{o} {paths[o]} {found} the {kind} {other} {paths[other]}; {how}")
    for o in replaced:
        if o in paths:
            check_replaceable(paths[o], o)


def _given(args: argparse.Namespace) -> dict[str, str]:
    return {_flag(k): v for k, v in vars(args).items() if isinstance(v, str) and v and not v.startswith("hf:")}


def check_paths_apart(args: argparse.Namespace) -> None:
    """Refuse, before anything is touched, an output that is, contains or sits inside an input
    or another output: replacing it would delete the input (e.g. --out equal to --source)."""
    check_apart(_given(args), [_flag(d) for d in OUTPUT_ARGS])


def declared_outs(root: str | os.PathLike = ".") -> list[Path]:
    """Every out, metric and plot file the stages of root/dvc.yaml declare (real paths; none when there is no
    readable dvc.yaml; a path with ${...} in it is left out: it is not known without the params)."""
    try:
        stages = (yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return []
    found = []
    for stage in stages.values() if isinstance(stages, dict) else ():
        if not isinstance(stage, dict):
            continue
        base = Path(root) / str(stage.get("wdir", "."))
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or ():
                name = next(iter(entry), None) if isinstance(entry, dict) else entry
                if isinstance(name, str) and "${" not in name:
                    found.append(Path(os.path.realpath(base / name)))
    return found


def stage_outputs_owned(args: argparse.Namespace, root: str | os.PathLike = ".") -> list[str]:
    """The stage's output paths that are (inside) an out dvc.yaml declares: DVC owns those (`dvc repro` deletes
    a declared out itself before it runs the stage, except a persisted one, which the stage manages), so they
    are domaintune's to replace even when an older version wrote them without core.io's marker. Any other
    existing folder at an output path must hold the marker (core.io.check_replaceable): the stage then never
    deletes a folder of the user's that a hand-typed --out happens to name."""
    declared = declared_outs(root)
    owned = []
    for dest in OUTPUT_ARGS:
        value = getattr(args, dest, None)
        if isinstance(value, str) and value:
            real = Path(os.path.realpath(Path(root) / value))
            if any(real == d or d in real.parents for d in declared):
                owned.append(value)
    return owned


def stage_parser(name: str, description: str, *, inp: str | None = None, out: str | None = None,
                 metrics: str | None = "metrics JSON (dvc metrics)") -> argparse.ArgumentParser:
    """--params plus the flags most stages share; each given help text adds its flag.

    --in (args.in_dir) is the stage's input dataset folder, --out its main output,
    --metrics the small JSON that `dvc metrics` reads.
    """
    ap = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if inp:
        ap.add_argument("--in", dest="in_dir", required=True, help=inp)
    if out:
        ap.add_argument("--out", required=True, help=out)
    if metrics:
        ap.add_argument("--metrics", required=True, help=metrics)
    return ap


# Set before any library is imported (stages import torch/transformers inside their functions):
# transformers' "Loading weights" / "Writing model shards" bars and load reports (expected missing
# heads on a fresh classifier), Hugging Face / evidently telemetry (pointless and noisy offline).
# setdefault: a user who wants any of it back sets the variable.
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",              # evidently's (and iterative-telemetry's) off switch
}


def quiet_libraries() -> None:
    """Process-wide: library chatter off (env above), only domaintune's own INFO lines shown."""
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    # The variables are read at import: if a library is already in, tell it directly.
    if "huggingface_hub" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1":
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    if "transformers" in sys.modules and os.environ["TRANSFORMERS_VERBOSITY"] == "error":
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("domaintune").setLevel(logging.INFO)
    # matplotlib logs "generated new fontManager" (INFO) on a fresh machine; its warnings still show.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    # peft's PeftModel.__init__ reads transformers' deprecated `is_gradient_checkpointing` alias on
    # every LoRA model it wraps: their deprecation, not something our code calls or can change.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)


@dataclass(frozen=True)
class StageIO:
    """What a stage was given on its command line (the same strings as in dvc.yaml): the paths a task's hook
    reads and writes. Library code takes this, never argparse's namespace; None = not given to this stage."""
    params: str = "params.yaml"
    in_dir: str | None = None     # --in: the dataset folder the stage reads
    out: str | None = None        # --out: what the stage writes
    metrics: str | None = None    # --metrics: the stage's metrics JSON
    source: str | None = None     # ingest: file, folder or hf:<name>
    model: str | None = None      # evaluate/export/drift: the model folder read
    encoder: str | None = None    # finetune: the (DAPT) encoder folder
    calibration: str | None = None  # export: evaluate's report folder
    report: str | None = None     # audit: report folder
    embeddings: str | None = None  # audit: embedding cache (a persistent out)
    decisions: str | None = None  # audit: human-review decisions CSV
    checkpoints: str | None = None  # dapt/finetune: resumable training state
    live: str | None = None       # dapt/finetune: DVCLive folder
    audit: str | None = None      # export: audit report folder (model card)
    dapt: str | None = None       # export: DAPT encoder folder (model card)
    extra_rows: str | None = None  # finetune: the augmented and replayed train rows it adds (a DVC out)
    init_model: str | None = None  # finetune: the warm start's classifier folder (a materialised version)
    init_data: str | None = None   # finetune: that version's dataset folder (its train rows: replay, EWC)
    init_version: str | None = None  # finetune: the version's tag, as the records name it
    progress: bool = True         # a console progress bar
    argv: tuple[str, ...] = ()    # the stage's own arguments, to relaunch it under torchrun

    @classmethod
    def of(cls, args: argparse.Namespace, argv: Sequence[str] = ()) -> "StageIO":
        given = vars(args)
        kw = {f.name: given[f.name] for f in fields(cls) if f.name in given and f.name not in ("progress", "argv")}
        return cls(**kw, progress=not given.get("no_progress", False), argv=tuple(argv))


def record_seconds(metrics_path: str | None, seconds: float) -> None:
    """Add the stage's wall time to its metrics JSON (the run summary reads it), atomically."""
    if not metrics_path or not os.path.isfile(metrics_path):
        return
    with open(metrics_path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        return
    data["stage_seconds"] = round(seconds, 1)
    tmp = f"{metrics_path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    os.replace(tmp, metrics_path)


def run_stage(name: str, fn: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser,
              argv: Sequence[str] | None = None) -> int:
    """Parse, run fn(args), print "<name>: done in X s" (plus the line fn returns, if any).

    Failures the user can fix (bad data, params, a failed gate) are one line and exit code 2.
    """
    quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(message)s", stream=sys.stderr)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_paths_apart(args)
        with claimed_outputs(stage_outputs_owned(args)):
            given = _given(args)
            check_apart(given, [], [_flag(d) for d in REPLACED_ARGS if _flag(d) in given])
            said = fn(args)
    except (DataError, ParamsError, StageError, OSError) as exc:  # OSError: a missing/unreadable path, a folder
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    record_seconds(getattr(args, "metrics", None), seconds)
    tail = f"; {said}" if isinstance(said, str) and said else ""
    print(f"{name}: done in {seconds:.1f} s{tail}", file=sys.stderr, flush=True)
    return 0
