"""Datasets: raw readers, the synthetic generator, the prepared (Parquet) format and its loader."""
