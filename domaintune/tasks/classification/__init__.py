"""base.task classification: an encoder classifier (single- or multi-label) over the text column.
One module per stage hook (see domaintune/tasks/__init__.py)."""
