"""domaintune: versioned domain adaptation and fine-tuning of transformer classifiers."""

__version__ = "0.1.0"
