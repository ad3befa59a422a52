"""Training: the loop (`trainer.py`), DCP checkpoints and resume (`checkpoint.py`), evaluation metrics
(`metrics.py`). The entry point is `pep_torchrec/train.py`."""
