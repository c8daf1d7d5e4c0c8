"""Model versions in git + DVC + GTO: plumbing, the verified cache, publish, diff, rollback, releases. Needs only core.

- plumbing.py  git and DVC subprocesses, the repository lock, the DVC remote, dvc.lock's outs (Out)
- cache.py     the DVC cache: object paths, md5 checks, and the one fetch-and-verify path (verify_objects)
- versions.py  published versions: Version records, listing, the served version, publish (as a challenger)
- promotion.py champion and challenger: promote, reject, each version's stage and the reason of each decision
- diff.py      what differs between two versions (or a version and the workspace)
- rollback.py  verify and restore a version in the workspace and serve it; put files back on failure
- release.py   materialising a published version's model outside the workspace, every file verified

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
