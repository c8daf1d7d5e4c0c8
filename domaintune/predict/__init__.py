"""Prediction: the predictors behind every export (opened by domaintune.tasks.load_predictor, the one loader),
and batch prediction over files.

- predictor.py   Predictor: calibrated predictions from a classifier export
- generation.py  GenerationPredictor: a causal-LM export behind the same interface
- entities.py    EntityPredictor: entities with calibrated scores from a token-tagger export
- batch.py       `domaintune predict` over files: readers, writers, bad-row policy
- log.py         the prediction log of serve and predict: ids, versions, probabilities; bounded and rotated

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
