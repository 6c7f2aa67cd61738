"""Models built from one set of transformer layers (`layers.py`)."""
