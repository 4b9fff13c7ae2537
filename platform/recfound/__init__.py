"""recfound: train and serve recommendation foundation models (RecFound) on Ray."""

__version__ = "0.1.0"
