"""Tests for pep_torchrec.modules.PEPEmbeddingBagCollection: the unsharded PEP semantics.

Legend: R = table rows, D = embedding dim, W = stored width, B = batch size.

The spec is `pep_reference_pooled`: threshold the WHOLE dense [R, D] table with the formula, then
`F.embedding_bag` with the KJT's offsets. The module (gather the looked-up rows, threshold_pool)
must match it, outputs and gradients (v, s in the rows, coarse parameters), for every granularity
and retrain, SUM and MEAN pooling, multi-hot and empty bags, weighted KJTs, a multi-feature table
and a one-row table. Comparisons run in float64 with values drawn away from the relu kink, so they
are exact up to rounding (1e-10).
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.modules import (
    GRANULARITIES,
    PEPEmbeddingBagCollection,
    PEPInitFn,
    canonical_granularity,
    pep_reference_pooled,
    stored_width,
    threshold_mode,
)
from pep_torchrec.ops import ThresholdMode

D = 4
B = 4
GK = 0.8
# t0 is a multi-feature table (features a, b); t1 has a single row.
TABLE_SPECS = [("t0", 9, ["a", "b"]), ("t1", 1, ["c"])]
FEATURES = ["a", "b", "c"]
# granularity, retrain: every threshold granularity, no thresholds, and the lottery-ticket retrain.
VARIANTS = [(g, False) for g in GRANULARITIES] + [(None, False), ("feature_dim", True)]
VARIANT_IDS = [f"{g}{'-retrain' if r else ''}" for g, r in VARIANTS]


def make_tables(pooling: PoolingType = PoolingType.SUM, dim: int = D) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=name, embedding_dim=dim, num_embeddings=rows, feature_names=list(features), pooling=pooling
        )
        for name, rows, features in TABLE_SPECS
    ]


def make_kjt(weighted: bool, seed: int = 0) -> KeyedJaggedTensor:
    """B = 4 bags per feature: multi-hot, empty bags, repeated ids."""
    gen = torch.Generator().manual_seed(seed)
    lengths = {"a": [3, 0, 1, 2], "b": [0, 2, 2, 0], "c": [1, 0, 3, 1]}
    rows = dict(a=9, b=9, c=1)
    values = [torch.randint(rows[f], (sum(lengths[f]),), generator=gen) for f in FEATURES]
    all_lengths = torch.tensor([n for f in FEATURES for n in lengths[f]])
    all_values = torch.cat(values)
    weights = (torch.rand(all_values.numel(), generator=gen, dtype=torch.float64) + 0.5) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=all_values, lengths=all_lengths, weights=weights
    )


def randomize(module: PEPEmbeddingBagCollection, seed: int = 0, gap: float = 0.05) -> None:
    """Random v, s (and masks) with about half of the elements pruned and no |v| within `gap` of its
    threshold (the kink, where reference and module may pick different subgradients)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(module, "threshold"):
            module.threshold.copy_(torch.randn(module.threshold.shape, generator=gen, dtype=torch.float64))
        if hasattr(module, "thresholds"):
            for param in module.thresholds.values():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64))
        for config in module.embedding_bag_configs():
            weight = module._embedding_bag_collection.embedding_bags[config.name].weight
            rows = config.num_embeddings
            weight[:, D:] = torch.randn(rows, weight.shape[1] - D, generator=gen, dtype=torch.float64)
            if module.mode is ThresholdMode.MASK:
                weight[:, D:] = (weight[:, D:] > 0).double()
            weight[:, :D] = torch.randn(rows, D, generator=gen, dtype=torch.float64) * 0.6
            s_full = reference_s(module, config.name, weight)
            if s_full is not None:
                margin = weight[:, :D].abs() - module.gk * torch.sigmoid(s_full)
                near = margin.abs() < gap
                weight[:, :D] = torch.where(
                    near, weight[:, :D] + torch.sign(weight[:, :D]) * 2 * gap, weight[:, :D]
                )


def reference_s(module: PEPEmbeddingBagCollection, table: str, stored: torch.Tensor, coarse=None):
    """s of `table` broadcastable to [R, D], read from the stored rows or the coarse parameter."""
    mode = module.mode
    if mode is ThresholdMode.ROW_DIM:
        return stored[:, D : 2 * D]
    if mode is ThresholdMode.ROW:
        return stored[:, D : D + 1]
    if mode is ThresholdMode.COARSE:
        if coarse is not None:
            return coarse
        return module.threshold if module.granularity in ("global", "dimension") else module.thresholds[table]
    return None


def coarse_params(module: PEPEmbeddingBagCollection) -> dict[str, nn.Parameter]:
    if hasattr(module, "threshold"):
        return {"threshold": module.threshold}
    if hasattr(module, "thresholds"):
        return {f"thresholds.{k}": v for k, v in module.thresholds.items()}
    return {}


def stored_weight(module: PEPEmbeddingBagCollection, table: str) -> torch.Tensor:
    return module._embedding_bag_collection.embedding_bags[table].weight


def build(
    granularity, retrain, pooling=PoolingType.SUM, weighted=False, **kwargs
) -> PEPEmbeddingBagCollection:
    torch.manual_seed(0)
    module = PEPEmbeddingBagCollection(
        make_tables(pooling), granularity=granularity, retrain=retrain, gk=GK, is_weighted=weighted, **kwargs
    ).double()
    randomize(module)
    return module


CASES = list(itertools.product(range(len(VARIANTS)), [PoolingType.SUM, PoolingType.MEAN], [False, True]))


@pytest.mark.parametrize(
    ("variant", "pooling", "weighted"),
    CASES,
    ids=[f"{VARIANT_IDS[v]}-{p.value.lower()}-{'w' if w else 'nw'}" for v, p, w in CASES],
)
def test_forward_and_gradients_match_whole_table_reference(
    variant: int, pooling: PoolingType, weighted: bool
) -> None:
    granularity, retrain = VARIANTS[variant]
    module = build(granularity, retrain, pooling, weighted)
    kjt = make_kjt(weighted)
    out = module(kjt)
    assert out.keys() == FEATURES
    pooled = out.to_dict()

    # The reference, on leaf copies of the module's parameters.
    ref_coarse = {name: p.detach().clone().requires_grad_() for name, p in coarse_params(module).items()}
    ref_stored = {}
    ref_pooled = {}
    for config in module.embedding_bag_configs():
        stored = stored_weight(module, config.name).detach().clone().requires_grad_()
        ref_stored[config.name] = stored
        coarse = None
        if module.mode is ThresholdMode.COARSE:
            coarse = (
                ref_coarse["threshold"]
                if "threshold" in ref_coarse
                else ref_coarse[f"thresholds.{config.name}"]
            )
        ref_pooled.update(
            pep_reference_pooled(
                stored[:, :D],
                reference_s(module, config.name, stored, coarse),
                kjt,
                feature_names=config.feature_names,
                gk=GK,
                pooling=pooling.value.lower(),
                mask=stored[:, D:] if module.mode is ThresholdMode.MASK else None,
                weighted=weighted,
            )
        )
    for name in FEATURES:
        assert pooled[name].shape == (B, D)
        torch.testing.assert_close(pooled[name], ref_pooled[name], rtol=1e-10, atol=1e-10)

    upstream = {
        f: torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i, f in enumerate(FEATURES)
    }
    sum((pooled[f] * upstream[f]).sum() for f in FEATURES).backward()
    sum((ref_pooled[f] * upstream[f]).sum() for f in FEATURES).backward()
    for table, ref in ref_stored.items():
        grad = stored_weight(module, table).grad
        torch.testing.assert_close(grad, ref.grad, rtol=1e-10, atol=1e-10)
        # Columns that are neither v nor s (ROW pad, MASK m) get exact zeros.
        unused = {ThresholdMode.ROW: slice(D + 1, None), ThresholdMode.MASK: slice(D, None)}.get(module.mode)
        if unused is not None:
            assert torch.equal(grad[:, unused], torch.zeros_like(grad[:, unused]))
    for name, param in coarse_params(module).items():
        torch.testing.assert_close(param.grad, ref_coarse[name].grad, rtol=1e-10, atol=1e-10)
    # Something actually got pruned and something kept, so the comparison means something.
    if module.mode is not ThresholdMode.NONE:
        kept = module.kept_mask("t0")
        assert kept.any() and not kept.all()


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=VARIANT_IDS)
def test_kept_counts_match_brute_force(variant: int) -> None:
    granularity, retrain = VARIANTS[variant]
    module = build(granularity, retrain)
    counts = module.kept_counts()
    for config in module.embedding_bag_configs():
        stored = stored_weight(module, config.name).detach()
        s_full = reference_s(module, config.name, stored)
        s_full = None if s_full is None else s_full.detach()
        expected = 0
        for r in range(config.num_embeddings):
            for d in range(D):
                v = float(stored[r, d])
                if module.mode is ThresholdMode.MASK:
                    kept = float(stored[r, D + d]) > 0.5 and v != 0.0
                elif s_full is None:
                    kept = v != 0.0
                else:
                    s = float(s_full.expand(config.num_embeddings, D)[r, d])
                    kept = abs(v) > GK / (1 + math.exp(-s))
                expected += int(kept)
        assert counts[config.name] == expected
        assert int(module.kept_mask(config.name).sum()) == expected
        assert module.margins(config.name).shape == (config.num_embeddings, D)


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=VARIANT_IDS)
def test_init_layout(variant: int) -> None:
    granularity, retrain = VARIANTS[variant]
    s0 = -7.5
    module = PEPEmbeddingBagCollection(make_tables(), granularity=granularity, retrain=retrain, s0=s0)
    mode = threshold_mode(granularity, retrain)
    assert module.mode is mode
    for config, stored_config in zip(module.embedding_bag_configs(), module.stored_embedding_bag_configs()):
        width = stored_width(D, granularity, retrain)
        assert config.embedding_dim == D and stored_config.embedding_dim == width
        weight = stored_weight(module, config.name).detach()
        assert weight.shape == (config.num_embeddings, width)
        bound = math.sqrt(1 / config.num_embeddings)
        assert weight[:, :D].abs().max() <= bound
        tail = weight[:, D:]
        if mode is ThresholdMode.ROW_DIM:
            assert torch.equal(tail, torch.full_like(tail, s0))
        elif mode is ThresholdMode.ROW:
            assert torch.equal(tail[:, 0], torch.full_like(tail[:, 0], s0))
            assert torch.equal(tail[:, 1:], torch.zeros_like(tail[:, 1:]))
        elif mode is ThresholdMode.MASK:
            assert torch.equal(tail, torch.ones_like(tail))
        else:
            assert tail.numel() == 0
    expected_coarse = {
        "global": {"threshold": (1,)},
        "dimension": {"threshold": (D,)},
        "field": {"thresholds.t0": (1,), "thresholds.t1": (1,)},
        "field_dim": {"thresholds.t0": (D,), "thresholds.t1": (D,)},
    }.get(granularity if not retrain else "", {})
    params = coarse_params(module)
    assert {name: tuple(p.shape) for name, p in params.items()} == expected_coarse
    for param in params.values():
        assert torch.equal(param.detach(), torch.full_like(param.detach(), s0))
    # Nothing at init is pruned by s0 = −7.5 except exact zeros (threshold ≈ 5e-4 ≪ typical |v|).
    if mode is not ThresholdMode.NONE:
        assert module.kept_counts()["t0"] > 0.9 * 9 * D


def test_logical_init_fn_initialises_v() -> None:
    tables = [
        EmbeddingBagConfig(
            name="t",
            embedding_dim=D,
            num_embeddings=5,
            feature_names=["f"],
            init_fn=lambda w: nn.init.constant_(w, 0.25),
        )
    ]
    module = PEPEmbeddingBagCollection(tables, granularity="feature", s0=-3.0)
    weight = stored_weight(module, "t").detach()
    assert torch.equal(weight[:, :D], torch.full((5, D), 0.25))
    assert torch.equal(weight[:, D], torch.full((5,), -3.0))


def test_init_fn_on_shards() -> None:
    """Row shards get the full layout; coarse tables take column shards; [v | s] column shards are refused."""
    init = PEPInitFn(nn.init.zeros_, dim=D, mode=ThresholdMode.ROW_DIM, s0=-2.0)
    shard = torch.full((3, 2 * D), 9.0)
    init(shard)
    assert torch.equal(shard, torch.cat([torch.zeros(3, D), torch.full((3, D), -2.0)], dim=1))
    with pytest.raises(ValueError, match="column-wise"):
        init(torch.empty(3, D))
    coarse = PEPInitFn(nn.init.ones_, dim=D, mode=ThresholdMode.COARSE, s0=-2.0)
    column_shard = torch.zeros(3, D // 2)
    coarse(column_shard)
    assert torch.equal(column_shard, torch.ones(3, D // 2))
    # A view into a bigger buffer (what TBE hands out) is written in place.
    buffer = torch.zeros(4, D + 4)
    PEPInitFn(nn.init.ones_, dim=D, mode=ThresholdMode.ROW, s0=-2.0)(buffer[1:3])
    assert torch.equal(buffer[1:3, D], torch.full((2,), -2.0)) and torch.equal(buffer[0], torch.zeros(D + 4))


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=VARIANT_IDS)
def test_meta_construction_and_reset_parameters(variant: int) -> None:
    granularity, retrain = VARIANTS[variant]
    module = PEPEmbeddingBagCollection(
        make_tables(), granularity=granularity, retrain=retrain, s0=-5.0, device=torch.device("meta")
    )
    assert module.device.type == "meta"
    assert all(p.device.type == "meta" for p in module.parameters())

    # What DMP does for unsharded parts: materialise meta parameters module by module and call the
    # owning module's reset_parameters().
    def materialise(submodule: nn.Module) -> None:
        had_meta = False
        for name, param in submodule._parameters.items():
            if param is not None and param.device.type == "meta":
                submodule._parameters[name] = nn.Parameter(torch.full_like(param, float("nan"), device="cpu"))
                had_meta = True
        if had_meta and hasattr(submodule, "reset_parameters"):
            submodule.reset_parameters()

    module.apply(materialise)
    module.reset_parameters()  # the stored tables: DMP's sharded EBC runs their init_fn instead
    assert module.device.type == "cpu"
    reference = PEPEmbeddingBagCollection(make_tables(), granularity=granularity, retrain=retrain, s0=-5.0)
    for config in reference.embedding_bag_configs():
        weight = stored_weight(module, config.name).detach()
        expected = stored_weight(reference, config.name).detach()
        assert torch.equal(weight[:, D:], expected[:, D:])
        assert torch.isfinite(weight).all() and weight[:, :D].abs().max() <= math.sqrt(
            1 / config.num_embeddings
        )
    for param in coarse_params(module).values():
        assert torch.equal(param.detach(), torch.full_like(param.detach(), -5.0))
    module(make_kjt(False))  # usable


def test_reset_parameters_restores_layout_after_training() -> None:
    module = PEPEmbeddingBagCollection(make_tables(), granularity="field_dim", s0=-4.0)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(3.0)
    module.reset_parameters()
    assert torch.equal(module.thresholds["t0"].detach(), torch.full((D,), -4.0))
    assert stored_weight(module, "t0").detach().abs().max() <= 1 / 3


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=VARIANT_IDS)
def test_state_dict_keys(variant: int) -> None:
    granularity, retrain = VARIANTS[variant]
    module = PEPEmbeddingBagCollection(make_tables(), granularity=granularity, retrain=retrain)
    keys = set(module.state_dict())
    tables = {f"_embedding_bag_collection.embedding_bags.{t}.weight" for t in ("t0", "t1")}
    coarse = {
        "global": {"threshold"},
        "dimension": {"threshold"},
        "field": {"thresholds.t0", "thresholds.t1"},
        "field_dim": {"thresholds.t0", "thresholds.t1"},
    }
    assert keys == tables | (set() if retrain else coarse.get(granularity, set()))
    # Round trip into a fresh module.
    other = PEPEmbeddingBagCollection(make_tables(), granularity=granularity, retrain=retrain)
    other.load_state_dict(module.state_dict())
    kjt = make_kjt(False)
    assert torch.equal(other(kjt).values(), module(kjt).values())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_sparsity_pressure_prunes_monotonically(granularity: str) -> None:
    """Plain SGD with s_push > 0: the kept count never rises and ends well below the start."""
    torch.manual_seed(0)
    rows = 20
    tables = [EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=rows, feature_names=["f"])]
    module = PEPEmbeddingBagCollection(tables, granularity=granularity, s0=-4.0, s_push=0.5, s_decay=1e-3)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    # One id per bag, every row every step.
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.arange(rows), lengths=torch.ones(rows, dtype=torch.int64)
    )
    counts = [module.kept_counts()["t"]]
    for _ in range(30):
        optimizer.zero_grad()
        module(kjt)["f"].pow(2).sum().backward()
        optimizer.step()
        counts.append(module.kept_counts()["t"])
    assert all(b <= a for a, b in zip(counts, counts[1:])), counts
    assert counts[-1] < 0.5 * counts[0], counts


def test_module_pressure_multiplicity() -> None:
    """Row modes: per id occurrence. Coarse: once per (table, feature) call on the [D] view, so a
    [1] parameter expanded to [D] gets D × per call."""
    kjt = make_kjt(False)
    occurrences = {
        "t0": torch.bincount(torch.cat([kjt["a"].values(), kjt["b"].values()]), minlength=9),
        "t1": torch.bincount(kjt["c"].values(), minlength=1),
    }
    calls = {"t0": 2, "t1": 1}
    s_decay, s_push = 0.1, 0.7
    for granularity in GRANULARITIES:
        grads = []
        for decay, push in ((0.0, 0.0), (s_decay, s_push)):
            module = build(granularity, False, s_decay=decay, s_push=push)
            module(kjt).values().sum().backward()
            grads.append(module)
        plain, pressed = grads
        for table in ("t0", "t1"):
            diff = stored_weight(pressed, table).grad - stored_weight(plain, table).grad
            stored = stored_weight(pressed, table).detach()
            expected = torch.zeros_like(diff)
            count = occurrences[table].double().unsqueeze(1)
            if granularity == "feature_dim":
                expected[:, D:] = count * (s_decay * stored[:, D:] - s_push)
            elif granularity == "feature":
                expected[:, D : D + 1] = count * (s_decay * stored[:, D : D + 1] - s_push)
            torch.testing.assert_close(diff, expected, rtol=0, atol=1e-12)
        for name, param in coarse_params(pressed).items():
            diff = param.grad - coarse_params(plain)[name].grad
            term = s_decay * param.detach() - s_push
            if granularity in ("global", "dimension"):
                num_calls = sum(calls.values())
            else:
                num_calls = calls[name.split(".")[1]]
            per_element = D if granularity in ("global", "field") else 1
            torch.testing.assert_close(diff, num_calls * per_element * term, rtol=0, atol=1e-12)


def test_lottery_ticket() -> None:
    module = PEPEmbeddingBagCollection(make_tables(), granularity="feature_dim", retrain=True).double()
    gen = torch.Generator().manual_seed(0)
    weights = {
        c.name: torch.randn(c.num_embeddings, D, generator=gen, dtype=torch.float64)
        for c in module.embedding_bag_configs()
    }
    masks = {
        c.name: torch.rand(c.num_embeddings, D, generator=gen) > 0.5 for c in module.embedding_bag_configs()
    }
    module.load_lottery_ticket(weights, masks)
    for name in weights:
        stored = stored_weight(module, name).detach()
        assert torch.equal(stored[:, :D], weights[name] * masks[name])
        assert torch.equal(stored[:, D:], masks[name].double())
        assert torch.equal(module.kept_mask(name), masks[name] & (weights[name] != 0))
    # Masked elements get no gradient, so no optimizer ever moves them.
    module(make_kjt(False)).values().pow(2).sum().backward()
    for name in weights:
        grad = stored_weight(module, name).grad
        assert torch.equal(grad[:, :D][~masks[name]], torch.zeros_like(grad[:, :D][~masks[name]]))
        assert torch.equal(grad[:, D:], torch.zeros_like(grad[:, D:]))

    with pytest.raises(ValueError, match="missing tables"):
        module.load_lottery_ticket({"t0": weights["t0"]}, masks)
    with pytest.raises(ValueError, match=r"must be \[9, 4\]"):
        module.load_lottery_ticket({**weights, "t0": torch.zeros(9, 3)}, masks)
    with pytest.raises(ValueError, match="retrain=True"):
        PEPEmbeddingBagCollection(make_tables()).load_lottery_ticket(weights, masks)


def test_shared_feature_across_tables_and_odd_dim() -> None:
    """A feature read by two tables gets TorchRec's `feature@table` keys; D need not be a multiple
    of 4 for the unsharded module."""
    tables = [
        EmbeddingBagConfig(name="x", embedding_dim=3, num_embeddings=5, feature_names=["f"]),
        EmbeddingBagConfig(
            name="y", embedding_dim=3, num_embeddings=5, feature_names=["f", "g"], pooling=PoolingType.MEAN
        ),
    ]
    module = PEPEmbeddingBagCollection(tables, granularity="feature", s0=-1.0)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f", "g"], values=torch.tensor([0, 4, 2, 3]), lengths=torch.tensor([2, 1, 0, 1])
    )
    out = module(kjt)
    assert out.keys() == ["f@x", "f@y", "g"]
    assert out.values().shape == (2, 9)


def test_granularity_names() -> None:
    for name in GRANULARITIES:
        assert canonical_granularity(name) == name
    # Spelling is forgiven (case, '-' / ' ' for '_'); other words are not.
    assert canonical_granularity("Feature-Dim") == "feature_dim"
    assert canonical_granularity(" field dim ") == "field_dim"
    assert stored_width(8, "feature_dim") == 16
    assert stored_width(8, "feature") == 12
    assert stored_width(8, "global") == 8
    assert stored_width(8, None) == 8
    assert stored_width(8, "field", retrain=True) == 16
    assert threshold_mode("dimension") is ThresholdMode.COARSE
    assert threshold_mode(None) is ThresholdMode.NONE


@pytest.mark.parametrize("name", ["row_dim", "dim", "element_wise", "table", "rowwise"])
def test_granularity_aliases_are_refused(name: str) -> None:
    """The six names only: a former alias gets the one-line error with the choices, and no alias list."""
    choices = re.escape(str(GRANULARITIES))
    with pytest.raises(ValueError, match=rf"^unknown PEP granularity '{name}'; choose one of {choices}$"):
        canonical_granularity(name)
    with pytest.raises(ValueError, match=choices):
        PEPEmbeddingBagCollection(make_tables(), granularity=name)


def test_bad_tables_are_refused() -> None:
    mixed = [
        EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=3, feature_names=["a"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=3, feature_names=["b"]),
    ]
    with pytest.raises(ValueError, match="one embedding_dim"):
        PEPEmbeddingBagCollection(mixed)
    with pytest.raises(ValueError, match="pooling must be SUM or MEAN"):
        PEPEmbeddingBagCollection(
            [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=3, pooling=PoolingType.NONE)]
        )
    with pytest.raises(ValueError, match="unknown table"):
        PEPEmbeddingBagCollection(make_tables()).margins("nope")


def test_s_push_can_change_between_steps() -> None:
    module = build("feature_dim", False)
    kjt = make_kjt(False)
    module.s_push = 1.0
    module(kjt).values().sum().backward()
    first = stored_weight(module, "t0").grad.clone()
    module.zero_grad()
    module.s_push = 0.0
    module(kjt).values().sum().backward()
    assert not torch.equal(first, stored_weight(module, "t0").grad)
