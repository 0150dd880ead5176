"""twotower: two-tower candidate retrieval with streaming sampling-bias correction."""

__version__ = "0.1.0"
