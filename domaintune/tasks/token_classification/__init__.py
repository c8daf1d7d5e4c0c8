"""base.task token_classification: an encoder tagging every word (named entities, BIO/IOB2 tags), one module
per stage hook (see domaintune/tasks/__init__.py). The dataset schema is the classification one with text = the
sentence and label = its words' offsets and tags as JSON; labels.json is the tag set (domaintune/data/tokens.py).

- ingest: word-level JSONL/Parquet (ingest.tokens_column, ingest.tags_column), CoNLL text files, or span JSONL
  (ingest.text_column, ingest.spans_column); IOB1 converted; misaligned rows named by file, row and field.
- dedupe: keyed on the sentence text (one text tagged two ways is a conflict); the tag set passes through.
- audit: cleanlab.token_classification on out-of-fold word probabilities of a logistic regression over frozen
  encoder embeddings of each word's first sub-word.
- dapt: masked-LM pre-training on the sentences, as for a classifier.
- finetune: AutoModelForTokenClassification-shaped tagger on the training engine (domaintune/train/tokens.py).
- evaluate: seqeval strict entity P/R/F1, token accuracy, temperature scaling, error tables, the gate.
- export: a transformers token-classification folder (+ onnx / onnx-int8), checked against the gates.
- drift: text descriptors and embeddings as for a classifier; the entity-type mix replaces the label mix.
"""
