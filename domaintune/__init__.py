"""domaintune: versioned domain adaptation and fine-tuning of transformer models (encoder classifiers, causal LMs).

The subpackages, lowest layer first: core, data, modeling, train, evaluate, export, predict, monitor, tasks,
serve; registry beside them (needs only core). README.md "Architecture" has the map and the rules.
"""

__version__ = "0.1.0"
