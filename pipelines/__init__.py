"""The workflow around pep_torchrec: torchx components per stage and the end-to-end demo.

This package imports pep_torchrec; pep_torchrec never imports it.
"""
