"""One module per DVC stage: `python -m stages.<name>` parses the paths dvc.yaml gives and calls
base.task's hook (domaintune/tasks/<task>/<name>.py), where the work is."""
