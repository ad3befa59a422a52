"""Helpers with no PEP or TorchRec knowledge: atomic directory swaps, native (C++) builds, logging set-up,
the user-error base class."""
