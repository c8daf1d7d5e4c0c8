"""The floor every other subpackage stands on: nothing here imports another subpackage.

- errors.py    DataError, ParamsError, StageError: bad input or a refusal becomes one line (exit 2)
- io.py        atomic_output (a crash leaves the old output or none), JSON files, stale temporaries
- params.py    typed, validated views of params.yaml (one frozen dataclass per section)
- device.py    where models run (cpu / cuda), bf16 on CPUs that are fast at it
- progress.py  the one progress reporter (a delayed tqdm bar on a terminal, log lines otherwise)
- stage.py     what every stage's command line shares: StageIO, parsing, paths kept apart, exit codes

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
