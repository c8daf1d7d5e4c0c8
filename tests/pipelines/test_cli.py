"""The `domaintune` CLI explains itself and fails in one line: help on every option, examples, --version,
exit 2 with one line (never a traceback, never monitor's drift code 1) for every bad argument or input,
and the retrain/rollback lock taken before Prefect is even imported."""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _fake_pipeline import REPO, held_lock, sh

from domaintune import __version__
from pipelines.cli import build_parser


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _subparsers(ap: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help_and_default():
    ap = build_parser()
    subs = _subparsers(ap)
    assert {"versions", "diff", "rollback", "retrain", "schedule", "monitor", "remote"} <= set(subs)
    for name, p in subs.items():
        text = p.format_help()
        assert f"domaintune {name}" in (p.epilog or ""), f"{name}: no example (`domaintune {name} ...`) in its epilog"
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            label = a.option_strings[0] if a.option_strings else a.dest
            assert a.help and a.help.strip(), f"domaintune {name} {label}: no help text"
            if a.nargs == 0:  # a flag: "(default: True)" after --no-publish reads backwards
                assert f"(default: {a.default})" not in " ".join(text.split()), f"{name} {label}: flag default"
            elif a.default not in (None, argparse.SUPPRESS, []) and a.option_strings:
                shown = f"(default: {a.default})" in " ".join(text.split()) or "default:" in a.help
                assert shown, f"{name} {label}: default not shown"
    top = [a for a in ap._actions if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert top and all(a.help for a in top)
    # the top-level help names every command (shadow-report was missing)
    assert all(name in ap.description for name in subs), ap.description


def test_version_flag():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"domaintune {__version__}"


@pytest.fixture()
def git_dir(tmp_path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    sh(root, "git", "init", "-q")
    return root


def cli_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """pipelines.cli.main in this process (cheap: imports are paid once), as a CompletedProcess."""
    from pipelines.cli import main

    try:
        rc = main(list(args))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), rc, out, err)


def test_missing_repo_is_one_line(tmp_path, capsys):
    assert_one_line_error(run_cli("versions", "--repo", str(tmp_path / "nope")), "no such folder")
    for cmd in (["diff"], ["rollback", "v1"], ["retrain"], ["remote"]):
        assert_one_line_error(cli_in_process(capsys, *cmd, "--repo", str(tmp_path / "nope")), "no such folder")
    assert_one_line_error(cli_in_process(capsys, "versions", "--repo", str(tmp_path)),
                          "not the root of a git repository")


def test_bad_cron_is_one_line_before_anything_starts(git_dir):
    proc = run_cli("schedule", "--cron", "not a cron", "--repo", str(git_dir))
    assert_one_line_error(proc, "--cron 'not a cron'", "five fields")
    assert "server" not in proc.stderr


def test_diff_and_versions_without_versions(git_dir):
    assert_one_line_error(run_cli("diff", "--repo", str(git_dir)), "no versions of domaintune yet")
    proc = run_cli("versions", "--repo", str(git_dir))
    assert proc.returncode == 0 and "no versions yet" in proc.stdout


def test_argparse_errors_stay_exit_2(git_dir):
    for argv in (["versions", "--nope"], ["retrain", "--retries", "many"], ["monitor"], []):
        proc = run_cli(*argv)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("domaintune")


@pytest.fixture()
def monitor_repo(tmp_path) -> Path:
    """Enough of a project for monitor's argument checks: params.yaml and the two model folders (empty:
    the checks must fail on the batch before anything would load them)."""
    root = tmp_path / "proj"
    (root / "models" / "drift_baseline").mkdir(parents=True)
    (root / "models" / "export").mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    return root


def test_monitor_bad_batch_is_one_line_exit_2_and_no_flow(monitor_repo, capsys):
    bad = monitor_repo / "batch.txt"
    bad.write_bytes("first text\nsecond text\ncaf\xe9 au lait\n".encode("latin-1"))
    proc = run_cli("monitor", "--batch", "batch.txt", "--repo", str(monitor_repo))
    assert_one_line_error(proc, "batch.txt", "row 3", "UTF-8")
    assert "Flow run" not in proc.stderr and "server" not in proc.stderr  # no Prefect flow started

    def monitor(batch: str, repo: Path = monitor_repo):
        return cli_in_process(capsys, "monitor", "--batch", batch, "--repo", str(repo))

    for batch, needle in (("missing.csv", "batch file not found"), (".", "not a file")):
        assert_one_line_error(monitor(batch), needle)
    (monitor_repo / "batch.csv").write_text("body\nhello\n")
    assert_one_line_error(monitor("batch.csv"), "'text'", "column missing")
    (monitor_repo / "empty.txt").write_text("one\n\nthree\n")
    assert_one_line_error(monitor("empty.txt"), "row 2", "empty or missing text")
    shutil.rmtree(monitor_repo / "models" / "export")
    assert_one_line_error(monitor("batch.csv"), "--model", "no such folder")
    assert_one_line_error(monitor("batch.csv", monitor_repo / "nope"), "no such folder")


def test_monitor_out_never_deletes_what_domaintune_did_not_write(monitor_repo, capsys):
    """`monitor --batch mon_out/batch.txt --out mon_out` deleted the batch and a notes file; each output that would
    replace or alter an input, another output or a foreign folder is refused (exit 2, one line) before the batch is
    read (its bytes are not UTF-8 here) or any model is looked at."""
    mon = monitor_repo / "mon_out"
    mon.mkdir()
    (mon / "batch.txt").write_bytes(b"first\n\xff second\n")
    (mon / "notes.txt").write_text("mine")
    theirs = monitor_repo / "theirs"
    theirs.mkdir()
    (theirs / "report.html").write_text("someone else's")
    inbox = monitor_repo / "inbox"
    inbox.mkdir()
    before = {p: p.read_bytes() for p in monitor_repo.rglob("*") if p.is_file()}
    how = "; an output must not be, contain or sit inside another path monitor uses (writing it would replace or alter "
    cases = [
        (["--batch", "mon_out/batch.txt", "--out", "mon_out"],
         f"--out {mon} contains the input --batch {mon / 'batch.txt'}{how}"),
        (["--batch", "mon_out/batch.txt", "--out", "theirs"],
         f"{theirs}: --out: an existing folder that domaintune did not write (it has no .domaintune-output file)"),
        (["--watch", "inbox", "--history", "inbox/history.csv"],
         f"--history {inbox / 'history.csv'} is inside the input --watch {inbox}{how}"),
        (["--batch", "mon_out/batch.txt", "--out", "reports", "--history", "reports/h.csv"],
         f"--out {monitor_repo / 'reports'} contains the output --history {monitor_repo / 'reports' / 'h.csv'}{how}"),
        (["--batch", "mon_out/batch.txt", "--review-queue", "mon_out/batch.txt"],
         f"--review-queue {mon / 'batch.txt'} is the input --batch {mon / 'batch.txt'}{how}"),
    ]
    for args, expected in cases:
        line = assert_one_line_error(cli_in_process(capsys, "monitor", *args, "--repo", str(monitor_repo)))
        assert line.startswith(f"domaintune monitor: error: {expected}"), line
    assert {p: p.read_bytes() for p in monitor_repo.rglob("*") if p.is_file()} == before


def test_monitor_reads_batches_with_the_one_reader_per_kind(monitor_repo, capsys):
    """A CR-only TXT (one text in one reader, 30 in another before) and a JSON lone surrogate: one line naming
    file (and row, field) before any model is looked at."""
    hostile = REPO / "tests" / "hostile"
    for name in ("old_mac_line_ends.txt", "lone_surrogate.jsonl"):
        shutil.copy(hostile / name, monitor_repo / name)
    line = assert_one_line_error(cli_in_process(capsys, "monitor", "--batch", "old_mac_line_ends.txt", "--repo",
                                                str(monitor_repo)))
    assert line == (f"domaintune monitor: error: {monitor_repo / 'old_mac_line_ends.txt'}: lines end with a lone "
                    "carriage return (old Mac style); save the file with \\n or \\r\\n line ends")
    line = assert_one_line_error(cli_in_process(capsys, "monitor", "--batch", "lone_surrogate.jsonl", "--repo",
                                                str(monitor_repo)))
    assert line.startswith(f"domaintune monitor: error: {monitor_repo / 'lone_surrogate.jsonl'}: row 10: field 'text': "
                           "holds a lone surrogate \\ud800")


def test_python_m_pipelines_share_the_cli_errors(monitor_repo):
    (monitor_repo / "b.txt").write_bytes(b"ok\n\xff\xfe\n")
    proc = subprocess.run([sys.executable, "-m", "pipelines.monitor", "--batch", "b.txt", "--repo",
                           str(monitor_repo)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert_one_line_error(proc, "b.txt", "row 2")


def test_stage_with_yaml_syntax_error_names_line_and_column(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("base:\n  seed: 1\nfinetune:\n  epochs: 2\n   lr: 0.1\n")
    proc = subprocess.run([sys.executable, "-m", "stages.finetune", "--in", str(tmp_path / "in"), "--encoder",
                           str(tmp_path / "enc"), "--out", str(tmp_path / "out"), "--metrics", str(tmp_path / "m.json"),
                           "--params", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"finetune: error: {bad}: line 5, column 6: YAML syntax error: mapping values are not allowed here"), line
    assert not (tmp_path / "out").exists()


def test_decisions_folder_is_a_clear_error(tmp_path):
    from domaintune.core.errors import DataError
    from domaintune.evaluate.audit import read_decisions

    with pytest.raises(DataError, match="folder, not a CSV file"):
        read_decisions(tmp_path, {}, [])


@pytest.mark.parametrize("command", [["retrain"], ["rollback", "v1"]])
def test_lock_contention_reported_before_prefect_is_imported(git_dir, command):
    """Structure, not a timer: the losing contender exits before Prefect is imported (so before any
    server starts) and never rewrites the holder's pid in the lock file."""
    from domaintune.registry import plumbing

    code = ("import sys\nfrom pipelines.cli import main\n"
            f"rc = main({[*command, '--repo', str(git_dir)]!r})\n"
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'prefect', 'torch', 'dvc'}))\n")
    with held_lock(git_dir):
        lock = git_dir / plumbing.LOCK_PATH
        before = lock.read_text()
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
        assert lock.read_text() == before  # still the holder's pid
    assert proc.stdout.strip() == "2 []", proc.stdout + proc.stderr
    assert "already running" in proc.stderr and before.strip() in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
