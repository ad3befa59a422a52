"""pep-torchrec: learnable embedding sizes (PEP) for TorchRec recommendation models."""

__version__ = "0.1.0"
