"""Data: readers, schema, history building, splits and the synthetic generator."""
