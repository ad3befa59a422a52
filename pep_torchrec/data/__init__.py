"""Datasets: raw files (`raw/`) → `data prepare` (`prepare/`) → the prepared Parquet format (`schema.py`)
→ the loader (`loader.py`); the synthetic generator (`synthetic.py`) stands in for raw files."""
