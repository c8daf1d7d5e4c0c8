"""One module per DVC stage: a pure core function plus a thin `main` for `python -m stages.<name>`."""
