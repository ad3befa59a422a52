"""Checkpoint RNG state: a resumed rank draws the same random numbers as the uninterrupted run, on
the CPU generator and on its CUDA device's (GPU dropout and init draw from the device's)."""

from __future__ import annotations

import pytest
import torch

from pep_torchrec.training import checkpoint


def test_cpu_rng_round_trip() -> None:
    state = checkpoint._rng_state()
    want = torch.rand(5)
    torch.rand(7)  # move on, as training would
    checkpoint._set_rng_state(state)
    assert torch.equal(torch.rand(5), want)
    if not torch.cuda.is_available():
        assert set(state) == {"torch"}


def test_cuda_rng_saved_and_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where CUDA is in use its generator state is saved beside the CPU one and restored on load
    (CPU machines have no CUDA: the device calls are stood in for)."""
    device_state = torch.arange(16, dtype=torch.uint8)
    restored: list[torch.Tensor] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: device_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda t: restored.append(t.clone()))
    state = checkpoint._rng_state()
    assert set(state) == {"torch", "cuda"}
    checkpoint._set_rng_state(state)
    assert len(restored) == 1 and torch.equal(restored[0], device_state)
