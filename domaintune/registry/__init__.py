"""Versions: git/DVC plumbing, published versions, diffs, verified rollback, releases. Needs only core.

- versions.py  publish, list, diff, verify and roll back versions (GTO tags, dvc.lock, the DVC remote)
- release.py   materialising a published version's model outside the workspace, every file verified

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
