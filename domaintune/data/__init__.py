"""Datasets: the schema between stages, every reader of user files, text normalisation, chat rows.

- dataset.py   the dataset folder (Parquet shards per split, labels.json, hashes)
- sources.py   reading a labelled source (CSV/TSV, JSONL, Parquet, TXT, folders, hf:) in bounded parts
- textnorm.py  normalisation and hashing for duplicate detection
- chat.py      chat conversations as prompt/response rows
- ingest.py    the ingest stage's work: check, split, account for every row
- dedupe.py    the dedupe stage's work: exact and near duplicates, cross-split leaks, manifest
- tokens.py    tagged sentences (token_classification): row format, BIO checks, sub-word alignment, entity F1
- tagged.py    reading tagged sentences (word-level, CoNLL, spans) and the token_classification ingest

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
