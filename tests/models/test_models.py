"""Tests for pep_torchrec.models: the CTR models, TrainModel, table configs, DMP sharding.

Legend: B = examples, F = sparse fields, N = dense features, D = embedding dim.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchmetrics.functional.classification import binary_auroc
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from pep_torchrec.data.batch import Batch
from pep_torchrec.data.schema import SparseFeature
from pep_torchrec.models import (
    LINEAR_TABLE_DIM,
    MODELS,
    CTRModel,
    TrainModel,
    build_model,
    embedding_tables,
    fm_interaction,
    model_options,
)
from pep_torchrec.models.base import XavierLinear

MODEL_NAMES = ["fm", "deepfm", "autoint", "dlrm"]
FEATURES = [SparseFeature(f"f{i}", 7 + 3 * i) for i in range(4)]
FEATURE_NAMES = [f.name for f in FEATURES]
DIM = 8
NUM_DENSE = 3
# Small hidden layers keep the unit tests fast.
SMALL_OPTIONS: dict[str, dict] = {
    "fm": {},
    "deepfm": {"mlp_dims": [16, 8]},
    "autoint": {"attention_dim": 8, "num_layers": 2, "mlp_dims": [16]},
    "dlrm": {"bottom_mlp_dims": [16], "top_mlp_dims": [16]},
}
# The learning test keeps every default (dropout, BatchNorm, 3 attention layers × 2 heads, ...) but
# narrows the widths: the 400-400-400 DNNs cost ~4× the time and learn this toy problem no better.
LEARNING_OPTIONS: dict[str, dict] = {
    "fm": {},
    "deepfm": {"mlp_dims": [64, 64]},
    "autoint": {"attention_dim": 16, "mlp_dims": [64, 64]},
    "dlrm": {"bottom_mlp_dims": [32], "top_mlp_dims": [64, 32]},
}


def make_ebc(features=FEATURES, dim=DIM, device=None) -> EmbeddingBagCollection:
    return EmbeddingBagCollection(tables=embedding_tables(features, dim), device=device)


def make_model(name: str, *, num_dense: int = NUM_DENSE, seed: int = 0, **options) -> CTRModel:
    torch.manual_seed(seed)
    return build_model(name, ebc=make_ebc(), num_dense=num_dense, **{**SMALL_OPTIONS[name], **options})


def make_kjt(
    batch_size: int, *, max_len: int = 3, features=FEATURES, generator: torch.Generator | None = None
) -> KeyedJaggedTensor:
    """Multi-hot bags of 0..max_len ids (empty bags included), keys in feature order."""
    lengths, values = [], []
    for feature in features:
        lengths_B = torch.randint(0, max_len + 1, (batch_size,), generator=generator)
        lengths.append(lengths_B)
        values.append(torch.randint(0, feature.cardinality, (int(lengths_B.sum()),), generator=generator))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features], values=torch.cat(values), lengths=torch.cat(lengths)
    )


def make_batch(batch_size: int, *, num_dense: int = NUM_DENSE, seed: int = 0, max_len: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        dense_features=torch.randn(batch_size, num_dense, generator=g),
        sparse_features=make_kjt(batch_size, max_len=max_len, generator=g),
        labels=torch.randint(0, 2, (batch_size,), generator=g).float(),
        weights=torch.ones(batch_size),
    )


def bag_sums(kjt: KeyedJaggedTensor, tables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hand-pooled [B, width] per feature: the sum of each bag's rows of `tables[feature]`."""
    out = {}
    for name, jt in kjt.to_dict().items():
        rows = [tables[name][bag].sum(dim=0) for bag in jt.to_dense()]
        out[name] = torch.stack(rows)
    return out


# --------------------------------------------------------------------------- shapes and gradients


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("num_dense", [0, NUM_DENSE])
def test_forward_shape(name: str, num_dense: int) -> None:
    model = make_model(name, num_dense=num_dense)
    batch = make_batch(6, num_dense=num_dense)
    logits = model(batch.dense_features, batch.sparse_features)
    assert logits.shape == (6,)
    assert torch.isfinite(logits).all()
    model.eval()  # BatchNorm in training mode cannot take one row; eval must
    single = make_batch(1, num_dense=num_dense, seed=1)
    assert model(single.dense_features, single.sparse_features).shape == (1,)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = make_model(name)
    loss, _ = TrainModel(model)(make_batch(16))
    loss.backward()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith("ebc.") for n in names)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name}: no gradient for {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient for {param_name}"
    if model.linear_ebc is not None:
        # Only column 0 of the linear tables is read; the padding columns must get nothing.
        for param in model.linear_ebc.parameters():
            assert param.grad[:, 1:].abs().sum() == 0


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("deepfm", {"batch_norm": False, "dropout": 0.0}),
        ("deepfm", {"mlp_dims": []}),
        ("autoint", {"use_dnn": False}),
        ("autoint", {"use_residual": False, "num_heads": 1, "attention_dropout": 0.1}),
        ("dlrm", {"bottom_mlp_dims": []}),
    ],
)
def test_option_variants_train(name: str, options: dict) -> None:
    model = make_model(name, **options)
    loss, _ = TrainModel(model)(make_batch(8))
    loss.backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{name} {options}: no gradient for {param_name}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_multi_hot_bags_are_sum_pooled_by_feature_name(name: str) -> None:
    model = make_model(name)
    kjt = make_kjt(5, max_len=4, generator=torch.Generator().manual_seed(3))
    tables = {
        config.feature_names[0]: model.ebc.embedding_bags[config.name].weight.detach()
        for config in model.ebc.embedding_bag_configs()
    }
    expected = bag_sums(kjt, tables)
    got_BFD = model.sparse_embeddings(kjt)
    torch.testing.assert_close(got_BFD, torch.stack([expected[n] for n in FEATURE_NAMES], dim=1))
    assert torch.isfinite(model(torch.randn(5, NUM_DENSE), kjt)).all()


class _ShuffledKeysEBC(nn.Module):
    """An EBC whose KeyedTensor lists keys in reverse order, like a sharded module may."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.inner = ebc

    def embedding_bag_configs(self):
        return self.inner.embedding_bag_configs()

    def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
        pooled = self.inner(kjt).to_dict()
        keys = list(reversed(pooled))
        return KeyedTensor.from_tensor_list(keys, [pooled[k] for k in keys])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_reads_pooled_embeddings_by_key_not_position(name: str) -> None:
    model = make_model(name).eval()
    torch.manual_seed(0)
    shuffled = build_model(
        name, ebc=_ShuffledKeysEBC(make_ebc()), num_dense=NUM_DENSE, **SMALL_OPTIONS[name]
    ).eval()
    # Same weights; state-dict keys differ only by the wrapper's "inner." level.
    state = {
        k.replace("ebc.", "ebc.inner.", 1) if k.startswith("ebc.") else k: v
        for k, v in model.state_dict().items()
    }
    shuffled.load_state_dict(state)
    batch = make_batch(8)
    torch.testing.assert_close(
        shuffled(batch.dense_features, batch.sparse_features),
        model(batch.dense_features, batch.sparse_features),
    )


# --------------------------------------------------------------------------- FM math


def test_fm_interaction_equals_brute_force_pairwise_sum() -> None:
    emb_BKD = torch.randn(5, 6, 4, dtype=torch.float64)
    expected = torch.zeros(5, dtype=torch.float64)
    for i, j in itertools.combinations(range(6), 2):
        expected += (emb_BKD[:, i] * emb_BKD[:, j]).sum(-1)
    torch.testing.assert_close(fm_interaction(emb_BKD), expected)


def test_fm_equals_hand_computed_logit() -> None:
    """bias + Σ dense·w + Σ per-id weights + Σ_{i<j} <v_i, v_j>, over multi-hot bags and dense fields."""
    model = make_model("fm")
    with torch.no_grad():
        # Non-trivial values everywhere, the unused linear columns included (they must be ignored).
        for param in model.linear_ebc.parameters():
            param.normal_()
        model.linear.bias.fill_(0.3)
        model.linear.dense_weight.normal_()
        model.dense_embedding.weight.normal_()
    batch = make_batch(7, max_len=3)
    dense_BN = batch.dense_features
    emb_tables = {
        c.feature_names[0]: model.ebc.embedding_bags[c.name].weight for c in model.ebc.embedding_bag_configs()
    }
    lin_tables = {
        c.feature_names[0]: model.linear_ebc.embedding_bags[c.name].weight[:, 0]
        for c in model.linear_ebc.embedding_bag_configs()
    }
    v = bag_sums(batch.sparse_features, emb_tables)
    w = bag_sums(batch.sparse_features, lin_tables)
    expected = []
    for b in range(7):
        fields = [v[n][b] for n in FEATURE_NAMES] + [
            dense_BN[b, m] * model.dense_embedding.weight[m] for m in range(NUM_DENSE)
        ]
        pairwise = sum(
            (fields[i] * fields[j]).sum() for i, j in itertools.combinations(range(len(fields)), 2)
        )
        linear = 0.3 + (dense_BN[b] * model.linear.dense_weight).sum() + sum(w[n][b] for n in FEATURE_NAMES)
        expected.append(linear + pairwise)
    got = model(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_fm_linear_tables_mirror_the_embedding_tables() -> None:
    model = make_model("fm")
    configs = model.linear_ebc.embedding_bag_configs()
    assert [c.name for c in configs] == [f"linear_t_{n}" for n in FEATURE_NAMES]
    assert [c.feature_names for c in configs] == [[n] for n in FEATURE_NAMES]
    assert [c.num_embeddings for c in configs] == [f.cardinality for f in FEATURES]
    assert all(c.embedding_dim == LINEAR_TABLE_DIM for c in configs)
    assert all(p.abs().sum() == 0 for p in model.linear_ebc.parameters())  # zero init
    assert build_model("autoint", ebc=make_ebc(), num_dense=0).linear_ebc is None
    assert build_model("dlrm", ebc=make_ebc(), num_dense=0).linear_ebc is None


# --------------------------------------------------------------------------- dense features


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_num_dense_zero_trains(name: str) -> None:
    model = make_model(name, num_dense=0)
    batch = make_batch(8, num_dense=0)
    assert batch.dense_features.shape == (8, 0)
    loss, (loss_detached, logits, labels, weights) = TrainModel(model)(batch)
    loss.backward()
    assert logits.shape == labels.shape == weights.shape == (8,)
    assert torch.isfinite(loss) and loss_detached.requires_grad is False
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_use_dense_false_ignores_dense_values(name: str) -> None:
    model = make_model(name, use_dense=False).eval()
    batch = make_batch(6)
    a = model(batch.dense_features, batch.sparse_features)
    b = model(batch.dense_features * 100 + 5, batch.sparse_features)
    torch.testing.assert_close(a, b)
    model_with_dense = make_model(name).eval()
    c = model_with_dense(batch.dense_features, batch.sparse_features)
    d = model_with_dense(batch.dense_features * 100 + 5, batch.sparse_features)
    assert not torch.allclose(c, d)


def test_dlrm_without_dense_features_feeds_a_constant_column() -> None:
    model = make_model("dlrm", num_dense=0).eval()
    assert model.dlrm.dense_arch.model._mlp[0]._linear.in_features == 1
    batch = make_batch(4, num_dense=0)
    expected = model.dlrm(torch.ones(4, 1), model.sparse_embeddings(batch.sparse_features)).squeeze(-1)
    torch.testing.assert_close(model(batch.dense_features, batch.sparse_features), expected)


# --------------------------------------------------------------------------- TrainModel


def _pad(batch: Batch, num_pad: int) -> Batch:
    """Append `num_pad` rows with empty bags, random dense values, label 1, weight 0."""
    kjt = batch.sparse_features
    b = batch.batch_size
    lengths_FB = kjt.lengths().view(len(kjt.keys()), b)
    lengths = torch.cat([lengths_FB, torch.zeros(len(kjt.keys()), num_pad, dtype=lengths_FB.dtype)], dim=1)
    padded_kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=kjt.keys(), values=kjt.values(), lengths=lengths.flatten()
    )
    return Batch(
        dense_features=torch.cat([batch.dense_features, torch.randn(num_pad, batch.dense_features.shape[1])]),
        sparse_features=padded_kjt,
        labels=torch.cat([batch.labels, torch.ones(num_pad)]),
        weights=torch.cat([batch.weights, torch.zeros(num_pad)]),
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_padding_rows_do_not_change_the_loss(name: str) -> None:
    # Eval mode: BatchNorm's *training* batch statistics do see padding rows (documented).
    train_model = TrainModel(make_model(name)).eval()
    batch = make_batch(10)
    loss, (_, logits, labels, weights) = train_model(batch)
    padded_loss, (_, padded_logits, padded_labels, padded_weights) = train_model(_pad(batch, 6))
    torch.testing.assert_close(padded_loss, loss)
    torch.testing.assert_close(padded_logits[:10], logits)
    assert padded_labels.shape == padded_weights.shape == (16,)


def test_padding_rows_get_no_gradient_in_training_mode() -> None:
    model = make_model("fm")  # no BatchNorm/dropout: train mode is deterministic
    batch = make_batch(10)
    TrainModel(model)(batch)[0].backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    TrainModel(model)(_pad(batch, 6))[0].backward()
    for expected, param in zip(grads, model.parameters()):
        torch.testing.assert_close(param.grad, expected)


def test_weighted_loss_formula_and_all_padding_batch() -> None:
    train_model = TrainModel(make_model("fm"))
    batch = make_batch(5)
    batch.weights = torch.tensor([0.5, 2.0, 0.0, 1.0, 1.5])
    loss, (_, logits, _, _) = train_model(batch)
    bce = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none")
    torch.testing.assert_close(loss, (bce * batch.weights).sum() / batch.weights.sum())
    batch.weights = torch.zeros(5)
    loss, _ = train_model(batch)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() == 0 for p in train_model.parameters())


# --------------------------------------------------------------------------- builder and configs


def test_build_model_rejects_unknown_names_and_options() -> None:
    ebc = make_ebc()
    with pytest.raises(
        ValueError, match=r"unknown model 'xdeepfm'; expected one of \['autoint', 'deepfm', 'dlrm', 'fm'\]"
    ):
        build_model("xdeepfm", ebc=ebc, num_dense=0)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mlp_dim'\] for model 'deepfm'"):
        build_model("deepfm", ebc=ebc, num_dense=0, mlp_dim=[4])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['mlp_dims'\] for model 'fm'"):
        build_model("fm", ebc=ebc, num_dense=0, mlp_dims=[4])


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("autoint", {"attention_dim": 10, "num_heads": 3}, "attention_dim"),
        ("autoint", {"num_layers": 0}, "num_layers"),
        ("autoint", {"attention_dropout": 1.0}, "attention_dropout"),
        ("deepfm", {"dropout": -0.1}, "dropout"),
        ("deepfm", {"mlp_dims": [16, 0]}, "mlp_dims"),
        ("dlrm", {"top_mlp_dims": []}, "top_mlp_dims"),
        ("dlrm", {"bottom_mlp_dims": 64}, "bottom_mlp_dims"),
    ],
)
def test_build_model_rejects_bad_values(name: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_model(name, ebc=make_ebc(), num_dense=0, **options)


def test_build_model_rejects_mixed_dims_and_negative_num_dense() -> None:
    mixed = EmbeddingBagCollection(
        tables=embedding_tables(FEATURES[:2], 8) + embedding_tables(FEATURES[2:], 4)
    )
    with pytest.raises(ValueError, match="one embedding_dim"):
        build_model("fm", ebc=mixed, num_dense=0)
    with pytest.raises(ValueError, match="num_dense"):
        build_model("fm", ebc=make_ebc(), num_dense=-1)


def test_model_options_lists_names_and_defaults() -> None:
    assert model_options("fm") == {"embedding_dim": None, "use_dense": True}
    assert model_options("deepfm")["mlp_dims"] == (400, 400, 400)
    assert set(model_options("autoint")) >= {
        "num_layers",
        "num_heads",
        "attention_dim",
        "use_residual",
        "use_dnn",
    }
    assert set(model_options("dlrm")) == {"embedding_dim", "use_dense", "bottom_mlp_dims", "top_mlp_dims"}
    assert set(MODELS) == set(MODEL_NAMES)


def test_embedding_dim_option_overrides_declared_width() -> None:
    """A module may declare wider rows than it outputs (PEP's [v|s]); the model trusts `embedding_dim`."""

    class _WideDeclared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_ebc()

        def embedding_bag_configs(self):
            return embedding_tables(FEATURES, DIM + 4)

        def forward(self, kjt: KeyedJaggedTensor) -> KeyedTensor:
            return self.inner(kjt)

    for name in MODEL_NAMES:
        model = build_model(name, ebc=_WideDeclared(), num_dense=2, embedding_dim=DIM, **SMALL_OPTIONS[name])
        batch = make_batch(4, num_dense=2)
        assert model(batch.dense_features, batch.sparse_features).shape == (4,)


def test_embedding_tables() -> None:
    tables = embedding_tables(FEATURES, 16, prefix="emb_")
    assert [t.name for t in tables] == [f"emb_{n}" for n in FEATURE_NAMES]
    assert [t.feature_names for t in tables] == [[n] for n in FEATURE_NAMES]
    assert [t.num_embeddings for t in tables] == [f.cardinality for f in FEATURES]
    assert {t.embedding_dim for t in tables} == {16}
    with pytest.raises(ValueError, match="embedding_dim"):
        embedding_tables(FEATURES, 0)
    with pytest.raises(ValueError, match="at least one sparse feature"):
        embedding_tables([], 8)


# --------------------------------------------------------------------------- learning


def _planted_dataset(num_rows: int, generator: torch.Generator) -> tuple[Batch, torch.Tensor]:
    """5 single-hot fields × 50 ids + 2 dense features; labels from a planted logistic model."""
    features = [SparseFeature(f"p{i}", 50) for i in range(5)]
    ids_FB = torch.randint(0, 50, (5, num_rows), generator=generator)
    planted_weights = torch.randn(5, 50, generator=torch.Generator().manual_seed(1234))
    dense_BN = torch.randn(num_rows, 2, generator=generator)
    true_logits = planted_weights.gather(1, ids_FB).sum(0) + 1.0 * dense_BN[:, 0] - 0.5
    labels = torch.bernoulli(torch.sigmoid(true_logits), generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=[f.name for f in features],
        values=ids_FB.flatten(),
        lengths=torch.ones(5 * num_rows, dtype=torch.long),
    )
    return Batch(dense_BN, kjt, labels, torch.ones(num_rows)), true_logits


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    kjt = batch.sparse_features  # single-hot: row r of field f is values[f * B + r]
    num_rows = batch.batch_size
    ids_FB = kjt.values().view(len(kjt.keys()), num_rows)[:, start:stop]
    return Batch(
        batch.dense_features[start:stop],
        KeyedJaggedTensor.from_lengths_sync(
            keys=kjt.keys(), values=ids_FB.flatten(), lengths=torch.ones(ids_FB.numel(), dtype=torch.long)
        ),
        batch.labels[start:stop],
        batch.weights[start:stop],
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_each_model_learns_a_planted_signal(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    train, _ = _planted_dataset(200 * 64, g)
    test, true_logits = _planted_dataset(2000, g)
    features = [SparseFeature(f"p{i}", 50) for i in range(5)]
    torch.manual_seed(0)
    model = build_model(name, ebc=make_ebc(features, dim=8), num_dense=2, **LEARNING_OPTIONS[name])
    train_model = TrainModel(model)
    optimizer = torch.optim.Adam(train_model.parameters(), lr=3e-3)
    for step in range(200):
        loss, _ = train_model(_slice(train, step * 64, (step + 1) * 64))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_model.eval()
    with torch.no_grad():
        _, (_, logits, labels, _) = train_model(test)
    auc = binary_auroc(logits, labels.long()).item()
    oracle_auc = binary_auroc(true_logits, labels.long()).item()
    assert auc > 0.70, f"{name}: test AUC {auc:.3f} after 200 steps (planted-model AUC {oracle_auc:.3f})"


# --------------------------------------------------------------------------- DistributedModelParallel


@pytest.fixture(scope="module")
def gloo_world_of_one():
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    if owns_group:
        dist.destroy_process_group()


def _fused_table_wise_dmp(module: nn.Module, process_group) -> DistributedModelParallel:
    """DMP with the default EBC sharder + fused Adagrad, every table forced table-wise onto the fused
    kernel (at these toy sizes the planner would otherwise pick data_parallel, which is not fused)."""
    sharder = EmbeddingBagCollectionSharder(
        fused_params={"optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": 0.05}
    )
    table_names = [
        config.name
        for child in module.modules()
        if isinstance(child, EmbeddingBagCollection)
        for config in child.embedding_bag_configs()
    ]
    constraints = {
        name: ParameterConstraints(sharding_types=["table_wise"], compute_kernels=["fused"])
        for name in table_names
    }
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"), constraints=constraints
    )
    plan = planner.collective_plan(module, [sharder], process_group)
    return DistributedModelParallel(module, device=torch.device("cpu"), sharders=[sharder], plan=plan)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.local_tensor() if hasattr(tensor, "local_tensor") else tensor


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_dmp_sharded_matches_unsharded_and_trains(name: str, gloo_world_of_one) -> None:
    reference = TrainModel(make_model(name)).eval()
    # The whole model on meta, as a large-table run builds it: DMP materialises and inits everything.
    with torch.device("meta"):
        sharded_module = TrainModel(make_model(name))
    sharded = _fused_table_wise_dmp(sharded_module, gloo_world_of_one)

    # Materialised from meta, the inits follow the eager recipe (not PyTorch's defaults, not garbage).
    for module in sharded.modules():
        if isinstance(module, XavierLinear):
            bound = (6.0 / (module.in_features + module.out_features)) ** 0.5
            assert module.weight.abs().max() <= bound
            assert module.bias is None or module.bias.abs().sum() == 0
        if isinstance(module, nn.BatchNorm1d):
            assert torch.all(module.running_var == 1) and torch.all(module.running_mean == 0)
    state = sharded.state_dict()
    for key, value in state.items():
        assert torch.isfinite(_local(value).float()).all(), key
        if ".linear_ebc." in key:
            assert _local(value).abs().sum() == 0, key

    assert set(state) == set(reference.state_dict())
    sharded.load_state_dict(reference.state_dict())
    sharded.eval()
    batch = make_batch(12)
    ref_loss, (_, ref_logits, _, _) = reference(batch)
    loss, (_, logits, _, _) = sharded(batch)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)

    # One training step: fused Adagrad updates the tables inside backward, Adam the dense parameters.
    sharded.train()
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(sharded.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    optimizer = CombinedOptimizer([sharded.fused_optimizer, dense_optimizer])
    before = {k: _local(v).clone() for k, v in sharded.state_dict().items()}
    loss, _ = sharded(make_batch(12, seed=1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    after = {k: _local(v) for k, v in sharded.state_dict().items()}
    for key, value in after.items():
        if "num_batches_tracked" in key or "running_" in key:
            continue
        assert not torch.equal(value, before[key]), f"{name}: {key} did not change in one step"
        if ".linear_ebc." in key:
            assert value[:, 1:].abs().sum() == 0, f"{key}: padding columns moved"
    loss, _ = sharded(make_batch(12, seed=2))
    assert torch.isfinite(loss)


def test_train_pipeline_sparse_dist_pipelines_both_embedding_modules(gloo_world_of_one) -> None:
    """DeepFM has two sharded modules (ebc, linear_ebc) fed by the same KJT; both must be pipelined."""
    with torch.device("meta"):
        module = TrainModel(make_model("deepfm"))
    sharded = _fused_table_wise_dmp(module, gloo_world_of_one)
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(sharded.named_parameters())),
        lambda params: torch.optim.Adam(params),
    )
    pipeline = TrainPipelineSparseDist(
        sharded, CombinedOptimizer([sharded.fused_optimizer, dense_optimizer]), torch.device("cpu")
    )
    batches = iter([make_batch(8, seed=seed) for seed in range(3)])
    losses = []
    with pytest.raises(StopIteration):
        while True:
            losses.append(pipeline.progress(batches)[0])
    assert len(losses) == 3 and all(torch.isfinite(loss) for loss in losses)
    assert len(pipeline._pipelined_modules) == 2  # no silent fallback to the unpipelined path
