"""A tiny real git + DVC project with trivial python stages, for registry and flow tests.

Same shape as the real DAG where the registry looks (data/audited/hashes.json
with a "dataset" hash, models/export, metrics/*.json kept in git, params.yaml
that domaintune.params validates), but each stage runs in well under a second.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Three small, clearly separable intents for runs of the real DAG on a tiny BERT.
TINY_INTENTS = {
    "refund": ["I want my money back for order {n}", "please refund the charge of {n} dollars",
               "refund request for invoice {n}", "how do I get a refund for {n}"],
    "password": ["I forgot my password again {n}", "reset my password please, user {n}",
                 "cannot log in, password rejected {n}", "password reset email never came {n}"],
    "shipping": ["where is my parcel {n}", "package {n} has not arrived yet",
                 "tracking number {n} shows no movement", "when will order {n} ship"],
}


def tiny_rows(per_class: int, start: int = 100) -> list[tuple[str, str, str]]:
    """(ticket_id, text, label) rows; numbers start..start+per_class-1 keep every text distinct."""
    rows = []
    for label, templates in TINY_INTENTS.items():
        for k in range(per_class):
            n = start + k
            rows.append((f"T{label[0]}{n:05d}", templates[k % len(templates)].format(n=n), label))
    return rows


def write_ticket_csv(path: Path, rows) -> None:
    import csv

    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["ticket_id", "text", "label"])
        w.writerows(rows)

AUDIT = """\
import hashlib, json, pathlib
src = pathlib.Path("src/data.csv").read_bytes()
out = pathlib.Path("data/audited"); out.mkdir(parents=True, exist_ok=True)
(out / "train.csv").write_bytes(src)
(out / "hashes.json").write_text(json.dumps({"dataset": hashlib.sha256(src).hexdigest()}))
pathlib.Path("metrics").mkdir(exist_ok=True)
pathlib.Path("metrics/audit.json").write_text(json.dumps({"rows": src.count(b"\\n")}))
"""

TRAIN = """\
import hashlib, json, pathlib, sys, yaml
epochs = yaml.safe_load(open("params.yaml"))["finetune"]["epochs"]
flaky = pathlib.Path("FAIL_ONCE")
if flaky.exists():  # a transient failure: gone on the next attempt
    flaky.unlink()
    sys.exit(1)
if epochs == 13:
    print("train: error: params.yaml: finetune.epochs: 13 is unlucky", file=sys.stderr)
    sys.exit(2)
data = pathlib.Path("data/audited/train.csv").read_bytes()
digest = hashlib.sha256(data + str(epochs).encode()).digest()
out = pathlib.Path("models/export"); (out / "sub").mkdir(parents=True, exist_ok=True)
(out / "weights.bin").write_bytes(digest * 512)
(out / "sub" / "model.json").write_text(json.dumps({"epochs": epochs}))
ckpt = pathlib.Path("models/checkpoints"); ckpt.mkdir(parents=True, exist_ok=True)
(ckpt / "README").write_text("resume state, cleared after a finished run")  # like finetune's
clf = pathlib.Path("fake/classifier")
if clf.is_dir():  # make_fake_repo(classifier=...): a real tiny classifier as the export, T = epochs / 3
    import shutil
    shutil.copytree(clf, out, dirs_exist_ok=True)
    meta = json.loads((out / "model.json").read_text())
    (out / "model.json").write_text(json.dumps({**meta, "temperature": epochs / 3}))
# metrics/evaluate.json in the shape the real evaluate stage writes, built by its own build_metrics
# from before/after dicts with the keys calibration.single_label_metrics returns.
from types import SimpleNamespace
from domaintune.evaluate.classifier import build_metrics
acc = digest[0] / 255
after = {"accuracy": acc, "macro_f1": acc / 2, "weighted_f1": acc / 2, "nll": 0.5, "brier": 0.2, "ece": 0.1,
         "mce": 0.2, "mean_confidence": 0.8}
before = {**after, "nll": 0.7, "ece": 0.25, "mean_confidence": 0.95}
res = SimpleNamespace(calibration={"temperature": 1.5}, before=before, after=after)
pathlib.Path("metrics/evaluate.json").write_text(json.dumps(build_metrics(res, 10, None)))
"""

DVC_YAML = """\
stages:
  audit:
    cmd: python fake/audit.py
    deps: [fake/audit.py, src/data.csv]
    params: [base.seed]
    outs: [data/audited]
    metrics:
      - metrics/audit.json:
          cache: false
  train:
    cmd: python fake/train.py
    deps: [fake/train.py, data/audited]
    params: [finetune.epochs]
    outs:
      - models/export
      - models/checkpoints:   # like finetune's: persisted, uncached, ignored by git -> not part of a version
          persist: true
          cache: false
    metrics:
      - metrics/evaluate.json:
          cache: false
"""


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    for k, v in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@x"), ("GIT_COMMITTER_NAME", "t"),
                 ("GIT_COMMITTER_EMAIL", "t@x"), ("DVC_NO_ANALYTICS", "1"), ("HF_HUB_OFFLINE", "1")):
        e.setdefault(k, v)
    return e


def sh(root: Path, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=root, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout}\n{proc.stderr}"
    return proc.stdout


@contextmanager
def held_lock(root: Path, timeout: float = 30):
    """Another thread holds `plumbing.repo_lock(root)` for the body (at most `timeout` s), like a
    concurrent retrain; on exit it lets go and is joined, so the lock is free again afterwards."""
    from domaintune.registry import plumbing

    held, release = threading.Event(), threading.Event()

    def holder():
        with plumbing.repo_lock(root):
            held.set()
            release.wait(timeout)

    t = threading.Thread(target=holder, name="repo-lock-holder", daemon=True)
    t.start()
    try:
        assert held.wait(5), f"the holder thread did not take the lock on {root} within 5 s"
        yield
    finally:
        release.set()
        t.join()



# ----------------------------------------------------------------------------- the real DAG, tiny

TINY_DAG_PARAMS = {
    "base.max_length": 32, "ingest.source": "tiny.csv", "ingest.id_column": "ticket_id", "audit.folds": 3,
    "dapt.corpus": ["tiny_corpus.txt"], "dapt.max_steps": 4, "dapt.block_size": 32, "dapt.batch_size": 4,
    "finetune.epochs": 1, "finetune.batch_size": 8, "evaluate.min_calibration_rows": 5, "drift.pca_components": 3,
    # A random tiny BERT scored on ~20 test rows: one flipped row is 5 points, so export's quality gates
    # (tested on their own in tests/export/test_export.py) would fail the DAG at random; timing passes kept short.
    "export.max_accuracy_drop": 100.0, "export.max_ece_increase": 100.0, "export.latency_repeats": 1,
    "export.latency_single_texts": 4,
}


def make_tiny_bert(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, 64-wide random BERT with the bundled MiniLM tokenizer, saved as safetensors.

    64 wide (intermediate 128): every Linear's in_features is a multiple of bitsandbytes' 64-value
    4-bit block, which its AVX512 CPU path requires, so qlora tests run the same on every CPU."""
    import torch
    from transformers import BertConfig, BertModel

    from domaintune.modeling.encoders import load_tokenizer, resolve_model

    torch.manual_seed(seed)
    tok = load_tokenizer(resolve_model("minilm"))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_dag(root: Path, tiny_bert: Path, rows) -> Path:
    """This repository's code, dvc.yaml and params.yaml in a fresh git repo at `root`, set up to run
    the real eight-stage DAG in about a minute: `rows` (ticket_id, text, label) and a tiny random BERT."""
    root.mkdir(parents=True, exist_ok=True)
    files = sh(REPO, "git", "ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(("bench/results/", "tests/")):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, root / rel)
    write_ticket_csv(root / "tiny.csv", rows)
    (root / "tiny_corpus.txt").write_text(
        "\n".join(f"customer {i} asked about refunds, passwords and parcels" for i in range(60)) + "\n")
    set_params(root, {"base.model": str(tiny_bert), **TINY_DAG_PARAMS})
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "tiny project")
    return root

def make_fake_repo(root: Path, rows: int = 10, classifier: Path | None = None) -> Path:
    """classifier: a saved classifier folder the train stage copies into models/export (servable versions)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "fake").mkdir()
    if classifier is not None:
        shutil.copytree(classifier, root / "fake" / "classifier")
    (root / "fake" / "audit.py").write_text(AUDIT)
    (root / "fake" / "train.py").write_text(TRAIN)
    (root / "src").mkdir()
    (root / "src" / "data.csv").write_text("text,label\n" + "".join(f"row {i},a\n" for i in range(rows)))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    set_params(root, {"finetune.epochs": 3, "finetune.method": "lora", "base.model": "minilm"})
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / ".gitignore").write_text("/data/\n/models/\n__pycache__/\n")
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "git", "config", "user.name", "tester")
    sh(root, "git", "config", "user.email", "tester@example.com")
    sh(root, str(BIN / "dvc"), "init", "-q")
    sh(root, str(BIN / "dvc"), "config", "core.analytics", "false")
    sh(root, str(BIN / "dvc"), "config", "core.autostage", "true")  # as in this repo: dvc git-adds dvc.lock
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-q", "-m", "init")
    return root


def set_params(root: Path, values: dict) -> None:
    """Set dotted keys in params.yaml, keeping its comments (tests must not depend on the repo's defaults)."""
    from ruamel.yaml import YAML

    yml = YAML()
    path = root / "params.yaml"
    data = yml.load(path.read_text())
    for dotted, value in values.items():
        section, key = dotted.split(".", 1)
        data[section][key] = value
    with path.open("w") as fh:
        yml.dump(data, fh)


def add_rows(root: Path, n: int, start: int = 1000) -> None:
    with open(root / "src" / "data.csv", "a") as fh:
        fh.writelines(f"row {i},b\n" for i in range(start, start + n))
    sh(root, "git", "commit", "-q", "-am", f"add {n} rows")


def workspace(root: Path) -> dict[str, bytes]:
    """Every file of the working tree (not .git, not the DVC cache/tmp), path -> bytes."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not rel.startswith((".git/", ".dvc/cache/", ".dvc/tmp/", ".domaintune/")) \
                and "__pycache__" not in rel:
            out[rel] = p.read_bytes()
    return out
