"""Moving full (unsharded) tensors into and out of a sharded model's state dict.

A DMP state dict holds ShardedTensor (or DTensor) values for sharded tables and plain tensors for
replicated ones; each rank sees only its own shards, placed at `shard_offsets` of the full table.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor


@torch.no_grad()
def copy_full_into_sharded(state_dict: Mapping[str, object], full: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy each full tensor in `full` into this rank's shards of the same key in `state_dict`.

    The state-dict tensors are views of the live parameters (TBE weights included), so this sets
    the model's weights in place.

    Returns:
        The keys that were written.
    """
    written = []
    for key, source in full.items():
        if key not in state_dict:
            raise KeyError(f"{key}: not in the sharded state dict (have {sorted(state_dict)[:8]}...)")
        target = state_dict[key]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                index = tuple(
                    slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes)
                )
                shard.tensor.copy_(source[index])
        elif isinstance(target, DTensor):
            raise NotImplementedError(f"{key}: DTensor state dicts are not supported yet")
        elif isinstance(target, torch.Tensor):
            target.copy_(source)
        else:
            raise TypeError(f"{key}: unexpected state-dict value {type(target).__name__}")
        written.append(key)
    return written


@torch.no_grad()
def local_pieces(value: object) -> list[tuple[tuple[slice, ...], torch.Tensor]]:
    """This rank's pieces of a state-dict value as (index into the full tensor, tensor) pairs."""
    if isinstance(value, ShardedTensor):
        return [
            (
                tuple(slice(o, o + s) for o, s in zip(sh.metadata.shard_offsets, sh.metadata.shard_sizes)),
                sh.tensor,
            )
            for sh in value.local_shards()
        ]
    if isinstance(value, torch.Tensor):
        return [(tuple(slice(0, n) for n in value.shape), value)]
    raise TypeError(f"unexpected state-dict value {type(value).__name__}")
