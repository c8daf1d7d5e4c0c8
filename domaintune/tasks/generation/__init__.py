"""base.task generation: a causal LM fine-tuned on prompt -> response (SFT, LoRA/QLoRA), one module per
stage hook (see domaintune/tasks/__init__.py); the stages keep their names, order, arguments and outs.
The dataset schema is the classification one with
text = the prompt and label = the response (labels.json is empty: there is no label set).

- audit: reports what hurts SFT (responses cut by base.max_length, counted in tokens; near-empty
  responses; near-duplicate train prompts with different responses; response-length outliers) and
  passes the data through unchanged.
- dapt: continued causal-LM pre-training on dapt.corpus and the train prompts and responses, in
  packed blocks (llm.pack), on the training engine; held-out perplexity before and after.
- finetune: SFT with completion-only loss (llm.encode), methods full | lora | qlora (NF4, double
  quant), optional packing (finetune.packing) and gradient checkpointing, resumable checkpoints.
- evaluate: held-out perplexity of the start model and the tuned model on the test responses, and
  sample generations.
- drift: the classifier's baseline format and verdict with prompt descriptors, the model's own hidden
  states and prompt familiarity (domaintune/tasks/generation/drift.py, which the drift stage calls), so
  `domaintune monitor` judges prompt batches.
- export: the adapter merged into a float (for QLoRA: dequantised) copy of the base, checked
  against the unmerged model's logits on test examples (export.merge_tolerance, else the stage
  fails), saved as safetensors + tokenizer + generation config + model card.
"""
