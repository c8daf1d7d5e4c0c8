"""Monitoring: drift statistics, baselines, verdicts and reports.

- drift.py       reference profiles and batch verdicts (the drift stage and `domaintune monitor`)
- stats.py       two-sample tests with calibrated nulls; the label-free accuracy estimate
- guard.py       two models on the same live requests: is the new one worse (shadow promotion, the guard)
- settings.py    MonitorSettings: the monitor's paths and their defaults (light: the CLI's --help reads it)
- monitoring.py  `domaintune monitor`: batches, folders, history, review queue, alarms
- report.py      the monitor's HTML report
- policy.py      monitor.on_drift: report, review queue or retrain, on correlated evidence only
- feedback.py    delayed labels: scoring each version on logged predictions (`domaintune feedback`)

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
