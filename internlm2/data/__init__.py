"""Data pipeline: readers, filters, dedup, packing, and the built-in corpus."""
