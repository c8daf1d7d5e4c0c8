"""Evaluation: calibration math, metrics and reports, the label audit, the run summary.

- calibration.py  scoring rules, reliability bins, temperature scaling, thresholds
- abstain.py      calibrated abstention on out-of-scope texts: scores, threshold, metrics (evaluate.abstain)
- report.py       plots and Markdown tables of the evaluate stage
- classifier.py   the evaluate stage's work for a classifier: calibrate, score, gate, report
- audit.py        the cleanlab label audit (labels that are classes; also a declared label set)
- generation.py   evaluation of a tuned causal LM (perplexity, samples, label-set accuracy)
- genaudit.py     the audit of prompt/response data (what hurts SFT)
- summary.py      the run summary (metrics/summary.json, ten lines)
- compare.py      champion vs challenger: paired bootstrap of the difference, the rows fair to compare on

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
