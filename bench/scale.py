"""Benchmark: ingest + dedupe at 1M and 10M synthetic rows: peak RSS, exact dedupe vs pandas, near-dup rows/s.

Data: bench/dedupe.py's generator (seeded support tickets: ~14% exact copies, ~8%
case/whitespace/width variants, ~3% one-word near copies, mostly non-ASCII words),
written as one Parquet source in 1M-row blocks (block k: synth(1M, seed + k), ids
renumbered), so 1M rows are exactly bench/dedupe.py's rows and 10M never sit in
memory as Python objects while they are generated.

Per size, each step in its own process, one after the other:
- ingest and dedupe: the real stages (`python -m stages.ingest`, `python -m stages.dedupe`, exact
  pass: dedupe.near_duplicates false), each process's peak RSS from wait4;
- compare: our dedupe core (domaintune.data.dedupe.dedupe_tables, normalisation and hashing included, on a
  thread per core as the stage runs it, then on one thread) against pandas `drop_duplicates` on the
  already normalised text (+ the same cross-split leak removal with sets), side by side in one process
  on the same ingested rows; all must keep the same rows. Our normalising + hashing alone
  (textnorm.text_keys over the same chunks, one thread) is timed too;
- near: the dedupe stage again with its default near_duplicates on (MinHash LSH + exact Jaccard), in its
  own process, up to --near-max-rows rows: its peak RSS (wait4) counts in the run's peak_rss_bytes, and
  the near pass's rows/s is rows / (its wall time - the exact stage's wall time), the two stage runs
  differing only in that pass.

    flock /tmp/domaintune-heavy.lock .venv/bin/python bench/scale.py --rows 1000000 10000000
    .venv/bin/python bench/scale.py --rows 20000 --out /tmp/s.json      # quick check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BLOCK = 1_000_000


def generate(rows: int, seed: int, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.dedupe import synth

    writer = None
    for k, start in enumerate(range(0, rows, BLOCK)):
        n = min(BLOCK, rows - start)
        import pandas as pd

        block = pd.concat(synth(n, seed + k).values(), ignore_index=True)
        block["id"] = [f"r{start + int(i[1:])}" for i in block["id"]]
        table = pa.Table.from_pandas(block, preserve_index=False)
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=100_000)
        del block, table
    writer.close()


MAX_AS = int(os.environ.get("SCALE_MAX_AS_GB", "12")) << 30  # address-space cap of each stage process: a stage that would need more fails alone


def _cap() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MAX_AS, MAX_AS))


def stage(args: list[str], cwd: Path) -> dict:
    """Run a stage in its own process; its wall time and peak RSS (from wait4, this child only)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE, preexec_fn=_cap,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    res = {"wall_s": round(wall, 2), "peak_rss_bytes": usage.ru_maxrss * 1024}
    if rc != 0:
        res["failed"] = f"exit {rc} under a {MAX_AS >> 30} GiB address-space cap: {out.decode(errors='replace')[-600:]}"
    return res


def ingested_without_ingest(work: Path) -> None:
    """The dataset ingest would write (the same rows, unvalidated), straight from the source, so dedupe
    is still measured when the ingest stage could not run."""
    import pyarrow.parquet as pq

    from domaintune.data.dataset import SPLITS, write_dataset

    t = pq.read_table(work / "source.parquet")
    split = t.column("split").to_numpy(zero_copy_only=False)
    labels = sorted(set(t.column("label").to_pylist()))
    write_dataset(work / "ingested", {s: t.filter(split == s) for s in SPLITS}, labels)


def compare(work: Path, seed: int) -> dict:
    """Our exact dedupe core vs pandas drop_duplicates, side by side on the same ingested rows."""
    import pandas as pd

    from domaintune.core.params import DedupeParams
    from domaintune.data import dedupe as dedupe_stage_lib
    from domaintune.data.dataset import SPLITS, read_split_table
    from domaintune.data.dedupe import CHUNK_ROWS, dedupe_tables
    from domaintune.data.textnorm import normalise_all, text_keys

    tables = {s: read_split_table(work / "ingested", s).select(["id", "text", "label"]) for s in SPLITS}
    n = sum(len(t) for t in tables.values())
    p = DedupeParams(near_duplicates=False, on_empty_class="drop")
    dedupe_tables({s: t.slice(0, 20_000) for s, t in tables.items()}, p, seed)  # warm-up: first-call costs
    t0 = time.perf_counter()
    res = dedupe_tables(tables, p, seed)
    ours_s = time.perf_counter() - t0
    ours_kept = sum(len(t) for t in res.tables.values())
    del res
    threads, dedupe_stage_lib.THREADS = dedupe_stage_lib.THREADS, 1  # the same, normalising on one thread only
    t0 = time.perf_counter()
    res = dedupe_tables(tables, p, seed)
    ours_one_thread_s = time.perf_counter() - t0
    dedupe_stage_lib.THREADS = threads
    if sum(len(t) for t in res.tables.values()) != ours_kept:
        raise SystemExit("one thread kept other rows than a thread per core")
    del res
    t0 = time.perf_counter()  # the part of ours that normalises and hashes, alone (as _stack runs it)
    for t in tables.values():
        for start in range(0, len(t), CHUNK_ROWS):
            text_keys(t.column("text").slice(start, CHUNK_ROWS))
    keys_s = time.perf_counter() - t0
    # The baseline gets the normalised text for free (computed before its clock starts).
    df = pd.concat([t.to_pandas().assign(split=s) for s, t in tables.items()], ignore_index=True)
    df.head(20_000).drop_duplicates(subset=["split", "text"])  # warm-up, as for ours
    t0 = time.perf_counter()
    df["norm"] = normalise_all(df["text"])
    normalise_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    within = df.drop_duplicates(subset=["split", "norm"])
    train = set(within.loc[within["split"] == "train", "norm"])
    val = within[within["split"] == "validation"]
    val = val[~val["norm"].isin(train)]
    test = within[within["split"] == "test"]
    test = test[~test["norm"].isin(train | set(val["norm"]))]
    pandas_kept = int((within["split"] == "train").sum()) + len(val) + len(test)
    pandas_s = time.perf_counter() - t0
    if ours_kept != pandas_kept:
        raise SystemExit(f"ours kept {ours_kept} rows, pandas {pandas_kept}: the comparison is void")
    return {"rows": n, "rows_kept": ours_kept, "ours_s": round(ours_s, 3), "threads": dedupe_stage_lib.THREADS,
            "ours_one_thread_s": round(ours_one_thread_s, 3), "pandas_s": round(pandas_s, 3),
            "normalise_s": round(normalise_s, 3), "ours_normalise_and_hash_s": round(keys_s, 3),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(step: str, work: Path, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--step", step, "--work", str(work), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def one_size(rows: int, seed: int, near_max: int, root: Path) -> dict:
    work = root / f"rows{rows}"
    work.mkdir(parents=True, exist_ok=True)
    params, params_near = work / "params.yaml", work / "params_near.yaml"
    for path, near_on in ((params, False), (params_near, True)):
        path.write_text(json.dumps({"base": {"seed": seed}, "ingest": {"id_column": "id", "split_column": "split"},
                                    "dedupe": {"near_duplicates": near_on}}))
    t0 = time.perf_counter()
    generate(rows, seed, work / "source.parquet")
    gen_s = time.perf_counter() - t0
    ing = stage(["stages.ingest", "--source", str(work / "source.parquet"), "--out", str(work / "ingested"),
                 "--metrics", str(work / "ingest.json"), "--params", str(params)], work)
    if "failed" in ing:
        ingested_without_ingest(work)
    ded = stage(["stages.dedupe", "--in", str(work / "ingested"), "--out", str(work / "deduped"),
                 "--metrics", str(work / "dedupe.json"), "--params", str(params)], work)
    shards = sorted(p.name for p in (work / "deduped").glob("*.parquet"))
    cmp_ = child("compare", work, seed)
    if "failed" in ded:
        raise SystemExit(f"dedupe failed at {rows} rows: {ded['failed']}")
    run = {"rows": rows, "peak_rss_bytes": max(ing["peak_rss_bytes"], ded["peak_rss_bytes"]),
           "ingest_completed": "failed" not in ing,
           "exact_dedupe_rows_per_s": round(rows / cmp_["ours_s"]),
           "pandas_rows_per_s": round(rows / cmp_["pandas_s"]),
           "exact_dedupe_vs_pandas": round(cmp_["pandas_s"] / cmp_["ours_s"], 3),
           # ours with its normalising and hashing on one thread (pandas runs on one)
           "exact_dedupe_vs_pandas_one_thread": round(cmp_["pandas_s"] / cmp_["ours_one_thread_s"], 3),
           # pandas with the normal forms made by the per-row reference (normalise_all) inside its clock
           "exact_dedupe_vs_pandas_both_normalising": round((cmp_["pandas_s"] + cmp_["normalise_s"]) / cmp_["ours_s"], 3),
           # ours on one thread less its own normalising and hashing (the same chunks through text_keys,
           # timed alone, on one thread)
           "exact_dedupe_vs_pandas_after_normalising": round(
               cmp_["pandas_s"] / max(cmp_["ours_one_thread_s"] - cmp_["ours_normalise_and_hash_s"], 1e-9), 3),
           "near_dup_rows_per_s": None,
           "generate_s": round(gen_s, 1), "ingest": ing, "dedupe_exact_stage": ded, "deduped_files": shards,
           "compare": cmp_}
    if rows <= near_max:
        nr = stage(["stages.dedupe", "--in", str(work / "ingested"), "--out", str(work / "deduped_near"),
                    "--metrics", str(work / "dedupe_near.json"), "--params", str(params_near)], work)
        if "failed" in nr:
            raise SystemExit(f"dedupe with the near pass failed at {rows} rows: {nr['failed']}")
        nr["removed"] = {k: v for k, v in json.loads((work / "dedupe_near.json").read_text())["removed"].items() if v}
        nr["near_part_s"] = round(nr["wall_s"] - ded["wall_s"], 2)
        run["near_dup_rows_per_s"] = round(rows / nr["near_part_s"]) if nr["near_part_s"] > 0 else None
        run["dedupe_near_stage"] = nr
        run["peak_rss_bytes"] = max(run["peak_rss_bytes"], nr["peak_rss_bytes"])
    else:
        run["near_skipped"] = f"{rows} rows > --near-max-rows {near_max}"
    shutil.rmtree(work, ignore_errors=True)
    return run


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--near-max-rows", type=int, default=10_000_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="scratch folder (default: a temporary one)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    if args.step:
        print(json.dumps(compare(Path(args.work), args.seed)))
        return
    root = Path(args.work or tempfile.mkdtemp(prefix="domaintune-scale-"))
    out = Path(args.out)
    result = {"benchmark": "streaming ingest + dedupe at scale (synthetic support tickets, bench/dedupe.py's generator)",
              "seed": args.seed, "runs": [],
              "machine": {"cpu_count": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
                          "platform": platform.platform()}}
    for rows in args.rows:  # written after each size, so a long 10M run leaves the 1M figures behind
        load_start = os.getloadavg()
        run = one_size(rows, args.seed, args.near_max_rows, root)
        run["loadavg_start_end"] = [[round(x, 2) for x in load_start], [round(x, 2) for x in os.getloadavg()]]
        result["runs"].append(run)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["runs"][-1], indent=2), flush=True)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
