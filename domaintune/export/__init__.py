"""Exports: every variant's writer, the quantised and ONNX variants, the model card.

- artifacts.py   the export variants (float32, int8, ONNX, ONNX int8): writers and loaders
- modelcard.py   the model card (README.md of the export)
- generation.py  the merged causal-LM export

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
