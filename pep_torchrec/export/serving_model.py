"""Artifact → inference model: the repo's CTR model over compact lookups, plus the vocabularies.

`load_artifact(path)` verifies the whole artifact (manifest format, every file's size and sha256,
every table's tensors) before building anything, and raises `ArtifactError` naming the file and the
problem otherwise. The model is the same class training used (`models.build_model`), with `ebc`
replaced by a `CompactEmbeddingBagCollection` and FM's `linear_ebc` by `LinearWeights`, so its
forward (interactions, MLPs) is the trained one, line for line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from pep_torchrec.data.spec_transform import SpecInputs
from pep_torchrec.data.vocab import Vocabulary, feature_vocabulary
from pep_torchrec.export.compact import (
    CompactEmbeddingBag,
    CompactEmbeddingBagCollection,
    DenseEmbeddingBag,
    LinearWeights,
    group_tables,
)
from pep_torchrec.export.format import (
    DENSE_FILE,
    EMBEDDINGS_FILE,
    ArtifactError,
    CompactTable,
    decode_table,
    load_tensors,
    read_manifest,
    verify_files,
)


@dataclass
class LoadedArtifact:
    """A verified artifact in memory.

    Attributes:
        path: the directory it was read from.  manifest: its manifest.
        model: the inference model (eval mode): forward(dense [B, N], KJT) → logits [B].
        vocab: feature → `Vocabulary` (raw value → id) for the features that have one.
        spec_inputs: a spec'd dataset's raw → features transform (`spec_transform.SpecInputs`), or None.
    """

    path: Path
    manifest: dict[str, Any]
    model: nn.Module
    vocab: dict[str, Vocabulary]
    spec_inputs: SpecInputs | None = None

    @property
    def version(self) -> str:
        return self.manifest["model_version"]

    @torch.no_grad()
    def logits(self, dense_BN: torch.Tensor, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.model(dense_BN, kjt)


def _table_configs(manifest: dict[str, Any]) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=t["name"],
            embedding_dim=int(t["embedding_dim"]),
            num_embeddings=int(t["num_embeddings"]),
            feature_names=list(t["feature_names"]),
            pooling=PoolingType.MEAN if t["pooling"] == "mean" else PoolingType.SUM,
        )
        for t in manifest["tables"]
    ]


def _vocabulary(table: pa.Table, name: str, where: Path) -> Vocabulary:
    try:
        return feature_vocabulary(table, name, where)
    except ValueError as e:
        raise ArtifactError(str(e)) from e


def load_artifact(path: str | Path) -> LoadedArtifact:
    """Verify and load an artifact directory. Raises ArtifactError (never a half-built model)."""
    path = Path(path)
    manifest = read_manifest(path)
    contents = verify_files(path, manifest)
    for required in (EMBEDDINGS_FILE, DENSE_FILE):
        if required not in contents:
            raise ArtifactError(f"{path / required}: not listed in the manifest")
    dtype, layout = manifest["dtype"], manifest["layout"]
    emb = load_tensors(contents[EMBEDDINGS_FILE], str(path / EMBEDDINGS_FILE))
    dense_state = load_tensors(contents[DENSE_FILE], str(path / DENSE_FILE))
    where = str(path / EMBEDDINGS_FILE)
    try:
        configs = _table_configs(manifest)
        bags = _embedding_bags(manifest, configs, emb, dtype, layout, where)
        ebc = CompactEmbeddingBagCollection(configs, bags)
        model = _build_model(manifest, configs, ebc, dense_state, path)
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{path}: inconsistent artifact ({type(e).__name__}: {e})") from e

    vocab = _load_vocab(manifest, contents, path)
    spec_inputs = None
    if "spec" in manifest["inputs"]:
        for entry in manifest["inputs"].get("joins", []):
            if entry.get("file") not in contents:
                raise ArtifactError(f"{path / str(entry.get('file'))}: side table not listed in the manifest")
        try:
            spec_inputs = SpecInputs(manifest["inputs"], vocab, contents, path)
        except Exception as e:  # a bad spec, stats or side table: refuse the artifact, naming it
            raise ArtifactError(
                f"{path}: inputs of the spec'd dataset unusable ({type(e).__name__}: {e})"
            ) from e
    return LoadedArtifact(path=path, manifest=manifest, model=model, vocab=vocab, spec_inputs=spec_inputs)


def _embedding_bags(
    manifest: dict[str, Any],
    configs: list[EmbeddingBagConfig],
    emb: dict[str, torch.Tensor],
    dtype: str,
    layout: str,
    where: str,
) -> dict[str, nn.Module]:
    """The tables' lookup modules: decoded compact tables or dense weights, grouped when they can be."""
    tables: dict[str, CompactTable | torch.Tensor] = {}
    poolings = {spec["name"]: spec["pooling"] for spec in manifest["tables"]}
    for spec, config in zip(manifest["tables"], configs):
        if layout == "compact":
            tables[config.name] = decode_table(config.name, emb, spec, dtype, where)
        else:
            weight = emb.get(f"{config.name}.weight")
            if weight is None or tuple(weight.shape) != (config.num_embeddings, config.embedding_dim):
                raise ArtifactError(f"{where}: dense table {config.name!r} missing or of the wrong shape")
            tables[config.name] = weight
    # One lookup over all tables when they can share one (same D, dtype, pooling: the usual case),
    # so a request pays one lookup call, not one per table; either way the same numbers.
    bags: dict[str, nn.Module] | None = group_tables(tables, poolings)
    if bags is None:
        bags = {
            name: CompactEmbeddingBag(t, pooling=poolings[name])
            if isinstance(t, CompactTable)
            else DenseEmbeddingBag(t, pooling=poolings[name])
            for name, t in tables.items()
        }
    return bags


def _build_model(
    manifest: dict[str, Any],
    configs: list[EmbeddingBagConfig],
    ebc: CompactEmbeddingBagCollection,
    dense_state: dict[str, torch.Tensor],
    path: Path,
) -> nn.Module:
    """The manifest's model around `ebc`, with the artifact's dense (and first-order) weights, in eval mode."""
    from pep_torchrec.models import build_model

    model_cfg = manifest["model"]
    # FM builds a full-size first-order EBC on `ebc.device`: meta, so nothing is allocated for it;
    # it is replaced by the artifact's [R] weights right after.
    ebc.device = torch.device("meta")
    model = build_model(
        model_cfg["name"], ebc=ebc, num_dense=int(model_cfg["num_dense"]), **model_cfg["options"]
    )
    ebc.device = torch.device("cpu")
    linear_names = model_cfg.get("linear_tables") or []
    if getattr(model, "linear_ebc", None) is not None:
        missing = [c.name for c in configs if f"linear.{c.name}" not in dense_state]
        if missing or sorted(linear_names) != sorted(c.name for c in configs):
            raise ArtifactError(f"{path / DENSE_FILE}: first-order weights missing for tables {missing}")
        model.linear_ebc = LinearWeights(configs, {c.name: dense_state[f"linear.{c.name}"] for c in configs})
    state = {k.removeprefix("model."): v for k, v in dense_state.items() if k.startswith("model.")}
    expected = {k for k in model.state_dict() if not k.startswith(("ebc.", "linear_ebc."))}
    if set(state) != expected:
        raise ArtifactError(
            f"{path / DENSE_FILE}: parameters do not match model {model_cfg['name']!r}: "
            f"missing {sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ArtifactError(f"{path / DENSE_FILE}: unexpected parameters {result.unexpected_keys[:5]}")
    model.eval()
    return model


def _load_vocab(manifest: dict[str, Any], contents: dict[str, bytes], path: Path) -> dict[str, Vocabulary]:
    """The vocabularies of the sparse inputs that have one (empty when the artifact has no vocab file)."""
    vocab: dict[str, Vocabulary] = {}
    vocab_file = manifest["dataset"].get("vocab")
    if vocab_file:
        if vocab_file not in contents:
            raise ArtifactError(f"{path / vocab_file}: not listed in the manifest")
        try:
            table = pq.read_table(io.BytesIO(contents[vocab_file]))
        except Exception as e:  # pyarrow raises several types for corrupt Parquet
            raise ArtifactError(f"{path / vocab_file}: not a readable Parquet file ({e})") from e
        for spec in manifest["inputs"]["sparse"]:
            if spec["vocab"]:
                vocab[spec["name"]] = _vocabulary(table, spec["name"], path / vocab_file)
    return vocab
