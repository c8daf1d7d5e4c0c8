"""base.task generation: a causal LM fine-tuned on prompt -> response (SFT, LoRA/QLoRA).
One module per stage hook (see domaintune/tasks/__init__.py)."""
