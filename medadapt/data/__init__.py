"""Data modules: SFT rows, text corpora and benchmarks, all ending in the same packed batches."""
