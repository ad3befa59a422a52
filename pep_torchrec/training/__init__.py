"""Training: the loop (`trainer.py`), DCP checkpoints and resume (`checkpoint.py`), evaluation metrics
(`metrics.py`), and `run_dir.py`: `RunDir`, the one reader/writer of a run directory's files (used by
prune, export and report too). The entry point is `pep_torchrec/train.py`."""
