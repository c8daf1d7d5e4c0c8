"""What the benchmark scripts share: the repository and bench/ on sys.path (each script runs as
`python bench/<name>.py`), the model hub kept offline (the brief: no network unless a user names a hub model),
where the public datasets sit, and the CPU a figure was measured on (every figure names its CPU).

Import it first: `from _common import REPO, cpu` (bench/ is the script's own folder, so it is on sys.path)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _path in (str(REPO), str(REPO / "bench")):
    if _path not in sys.path:
        sys.path.insert(0, _path)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

DATASETS = REPO.parent / "shared" / "datasets"  # ../shared/datasets: read in place, never copied into the project
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu(note: str | None = None) -> dict:
    """The CPU (lscpu's model name and the instruction-set flags that change int8/bf16 kernels), the cores this
    process may use, the Python version and the load average when asked."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)}
    flags = set(fields.get("Flags", "").split())
    info = {"model": fields.get("Model name") or platform.processor() or "unknown",
            "cores": len(os.sched_getaffinity(0)), "flags": [f for f in FLAGS if f in flags],
            "amx": any(f.startswith("amx") for f in flags), "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if note:
        info["note"] = note
    return info
