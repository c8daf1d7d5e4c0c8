"""Training: one engine, data parallelism, and the objectives it drives.

- engine.py       the training loop (steps, accumulation, checkpoints, exact resume)
- distributed.py  data-parallel processes (torchrun; gloo on CPU)
- optim.py        weight-decay groups and LR schedules
- classifier.py   fine-tuning an encoder classifier (full / freeze / LoRA / QLoRA / head / SetFit, multi-seed)
- setfit.py       SetFit's contrastive phase (pairs, cosine-similarity loss) on the engine
- augment.py      train-only augmentation: EDA operations and back-translation, each row traced to its source
- warmstart.py    warm starts from a previous version: shape check, head rows, replay rows, Fisher data
- regularize.py   L2-SP and EWC penalties towards the start weights
- tokens.py       fine-tuning a token tagger (first sub-word labelled, early stopping on entity F1)
- mlm.py          masked-LM domain-adaptive pre-training
- sft.py          causal-LM continued pre-training and supervised fine-tuning
- dapt.py         the MLM DAPT of an encoder (read, adapt or pass through, write)
- runkey.py       the one run key: which checkpoint a run may resume from
- curves.py       the one DVCLive writer and the curve names

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
