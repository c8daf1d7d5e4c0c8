"""Exports: every variant's writer, the quantised and ONNX variants, the model card.

- variants.py    the one list of export variants (light: the CLI reads it)
- artifacts.py   each variant's writer and loader (float32, int8, ONNX, ONNX int8)
- classifier.py  the export stage's work for a classifier: merge, write, verify every variant, card
- modelcard.py   the model card (README.md of the export)
- generation.py  the merged causal-LM export
- tokens.py      the token tagger's export (transformers folder, onnx, onnx-int8, gates, card)

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
