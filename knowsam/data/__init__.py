"""Data: sources and safe download, preparation of raw datasets, splits, the reader of prepared data, training batches."""
