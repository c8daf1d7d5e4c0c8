"""Versions in S3, tested for real: an S3-compatible server (moto's server mode) on 127.0.0.1.

Publish pushes to the bucket; a fresh clone with an empty cache pulls a version from it; rollback
restores from it byte for byte; a corrupted object in the bucket is detected and changes nothing;
the credentials (from the environment only) never reach a commit, a version record or a log line.
"""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
from _fake_pipeline import BIN, add_rows, make_fake_repo, sh, workspace

from domaintune.registry import cache, plumbing, rollback, versions

# Distinctive fake credentials: the test greps every commit, tag and log for them.
KEY_ID = "AKIADOMAINTUNETESTKEY"
SECRET = "domaintune-secret-never-logged-9f3c"
BUCKET = "dt-versions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on loopback for this module; stopped afterwards."""
    import boto3
    from moto.server import ThreadedMotoServer

    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield url, client
    finally:
        server.stop()
        mp.undo()


def _use_s3(root: Path, endpoint: str) -> str:
    name = plumbing.ensure_remote(root, f"s3://{BUCKET}/store")
    # The endpoint is machine-specific (like a credential profile): repo-local config, never committed.
    sh(root, str(BIN / "dvc"), "remote", "modify", "--local", name, "endpointurl", endpoint)
    return name


@pytest.fixture(scope="module")
def published(s3, tmp_path_factory):
    endpoint, client = s3
    root = make_fake_repo(tmp_path_factory.mktemp("s3") / "proj")
    _use_s3(root, endpoint)
    snaps = {}
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v1, _ = versions.publish(root, "first", stage="prod")
    snaps[v1.version] = workspace(root)
    add_rows(root, 4)
    sh(root, str(BIN / "dvc"), "repro", "-q")
    v2, _ = versions.publish(root, "more data", stage="prod")
    snaps[v2.version] = workspace(root)
    return root, snaps


def _bucket_keys(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


def _object_key(root: Path, version, rel: str) -> str:
    """The bucket key of the object DVC stores `rel` (a file inside a tracked out) under."""
    import json

    for out in plumbing.lock_outs(root, version.commit):
        if out.is_dir and rel.startswith(out.path + "/"):
            manifest = json.loads(cache.cache_path(cache.cache_dir(root), out.md5).read_text())
            inner = rel[len(out.path) + 1:]
            md5 = next(e["md5"] for e in manifest if e["relpath"] == inner)
            return f"store/files/md5/{md5[:2]}/{md5[2:]}"
    raise AssertionError(rel)


def test_publish_pushes_every_object_to_the_bucket(published, s3):
    root, _ = published
    _, client = s3
    keys = _bucket_keys(client)
    for v in versions.list_versions(root):
        for out in plumbing.lock_outs(root, v.commit):
            if out.in_git:
                continue
            md5 = out.md5
            assert f"store/files/md5/{md5[:2]}/{md5[2:]}" in keys, (v.tag, out.path)


def _pulled_clone(root: Path, endpoint: str, tmp_path: Path) -> Path:
    """A fresh git clone of the project, set to the bucket, its served version pulled from it."""
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(root), str(clone))
    sh(clone, "git", "fetch", "-q", "--tags")
    _use_s3(clone, endpoint)
    assert not (clone / ".dvc" / "cache").exists()
    sh(clone, str(BIN / "dvc"), "pull", "-q")
    return clone


def test_fresh_clone_pulls_and_rolls_back_from_s3_byte_identical(published, s3, tmp_path):
    root, snaps = published
    endpoint, _ = s3
    # The served version (v2) pulled into a fresh clone.
    clone = _pulled_clone(root, endpoint, tmp_path)
    now = workspace(clone)
    for rel in ("models/export/weights.bin", "models/export/sub/model.json", "data/audited/train.csv"):
        assert now[rel] == snaps["v2.0.0"][rel], rel
    # Rollback in the clone restores v1 from the bucket (its objects are not in the clone's cache).
    version, checked = rollback.rollback(clone, "v1.0.0")
    assert version.version == "v1.0.0" and checked >= 3
    now = workspace(clone)
    for rel, data in snaps["v1.0.0"].items():
        if rel.startswith(("data/", "models/export/")) or rel in ("params.yaml", "dvc.lock"):
            assert now[rel] == data, rel


def test_corrupted_object_in_the_bucket_is_detected_and_changes_nothing(published, s3, tmp_path):
    root, snaps = published
    endpoint, client = s3
    clone = _pulled_clone(root, endpoint, tmp_path)
    v1 = versions.get_version(clone, "v1.0.0")
    key = _object_key(root, versions.get_version(root, "v1.0.0"), "models/export/weights.bin")
    original = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    client.put_object(Bucket=BUCKET, Key=key, Body=b"corrupted by the test" + original[21:])
    try:
        before = workspace(clone)
        head = sh(clone, "git", "rev-parse", "HEAD")
        with pytest.raises(plumbing.RegistryError) as err:
            rollback.rollback(clone, "v1.0.0")
        assert "nothing was changed" in str(err.value)
        assert workspace(clone) == before and sh(clone, "git", "rev-parse", "HEAD") == head
        assert versions.served_version(clone) == "v2.0.0"
        # The bad object is not left in the local cache for a later run to trust.
        cached = [p for p in (clone / ".dvc" / "cache").rglob("*") if p.is_file()
                  and p.read_bytes().startswith(b"corrupted by the test")]
        assert cached == []
        assert v1.tag == "domaintune@v1.0.0"
    finally:
        client.put_object(Bucket=BUCKET, Key=key, Body=original)


def test_credentials_never_reach_git_records_or_logs(published, capfd):
    root, _ = published
    # Everything git holds: every object reachable from every ref (commits, trees, blobs, tag messages).
    objects = sh(root, "git", "rev-list", "--all", "--objects")
    blob_text = "".join(sh(root, "git", "cat-file", "-p", line.split()[0]) for line in objects.splitlines())
    tags = sh(root, "git", "for-each-ref", "--format=%(contents)", "refs/tags")
    config = (root / ".dvc" / "config").read_text()
    records = "".join(str(v.record) for v in versions.list_versions(root))
    logs = "".join(p.read_text(errors="replace") for p in (root / ".dvc" / "tmp").rglob("*.log")) \
        if (root / ".dvc" / "tmp").exists() else ""
    out, err = capfd.readouterr()
    for text in (blob_text, tags, config, records, logs, out, err):
        assert KEY_ID not in text and SECRET not in text
    # The endpoint and the bucket live only in the repo-local config, which git ignores.
    assert "endpointurl" not in config
    assert "endpointurl" in (root / ".dvc" / "config.local").read_text()
    assert ".dvc/config.local" not in sh(root, "git", "ls-files")
