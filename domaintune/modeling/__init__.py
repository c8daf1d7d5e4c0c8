"""Models: encoders and classifiers, causal LMs, adapters (LoRA/QLoRA surgery), embeddings.

- encoders.py    resolve, load, pool, embed, classify, save (the encoder classifier layout)
- chunks.py      long documents: truncate, head_tail or overlapping chunks, and pooling chunk logits per document
- tagger.py      the token tagger (token_classification): training module, transformers folder, per-word logits
- adapters.py    target modules, layer depth, 4-bit quantisation of Linear layers
- llm.py         causal-LM prompt formatting, completion-only labels, packing, scoring, merging
- causal.py      loading causal LMs (base and tuned) and encoding prompt/response pairs
- embeddings.py  the keyed on-disk embedding cache
- quantize.py    weight-only int8 export as plain safetensors
- tinyllm.py     a tiny random Llama with a tokenizer trained on the project's texts (tests, examples)

Nothing is imported here: import the module you need, so a stage (and its DVC deps) loads only
what it uses and the CLI answers --help at once.
"""
