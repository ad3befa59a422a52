"""The PEP mechanism outside the embedding op: the search stage (`stage.py`: gk growth, the optional
controller, snapshots), exact-budget masks, mask directories and row rules (`masks.py`), magnitude
pruning and the control masks (`controls.py`), and what a search learned (`diagnostics.py`)."""
