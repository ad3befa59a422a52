"""A deterministic Criteo-like click dataset with a planted model: the project's embedded default.

Every random quantity is a counter-based hash (splitmix64) of (seed, purpose, field, row or id), so a
row's content depends on its index alone: generation is chunked (bounded memory), any chunking gives
the same rows, and no per-id table is ever stored. A 10^7-row table costs no more than a 10^3 one.

The planted model, per row::

    id_f          ~ Zipf(zipf_exponent) over 1..cardinality_f - 1 (id 1 most frequent; id 0, the OOV
                    id, with probability oov_rate)
    x_d           = log1p(floor(exp(mu_d + z_d))),  z_d ~ N(0, 1)           (dense, already log1p'd)
    logit         = logit(base_ctr)
                    + sum_{f in signal} w_f(id_f)                          (first order)
                    + sum_{f < g in signal} <e_f(id_f), e_g(id_g)>         (rank-`interaction_rank` FM term)
                    + sum_{d in signal dense} a_d z_d
    label         ~ Bernoulli(sigmoid(logit))

with w_f(id) ~ N(0, first_order_scale² / #signal) and e_f(id) ~ N(0, σ_e² I) drawn by hashing
(seed, f, id), σ_e chosen so the interaction term has standard deviation `interaction_scale` when
ids are uniform. Noise fields and noise dense features do not enter the logit. Which fields carry
signal is drawn from the seed and recorded in schema.extra["signal_fields"].

`splitmix64`, `mix_key` and `hash_uniform` are also the pipeline's split hash (see `prepare`).

Legend: N = rows in a chunk.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------------------------------------------
# counter-based hashing


def _splitmix64_int(x: int) -> int:
    x = (x + _GOLDEN) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, element-wise on uint64 (wrapping arithmetic): a well-mixed bijection."""
    x = np.asarray(x, dtype=np.uint64) + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mix_key(*parts: int | str) -> int:
    """A 64-bit key from a tuple of ints/strings (e.g. (seed, "weight", field)), for `hash_uniform`."""
    key = 0
    for part in parts:
        if isinstance(part, str):
            part = int.from_bytes(part.encode()[:8].ljust(8, b"\0"), "little") ^ len(part)
        key = _splitmix64_int(key ^ (int(part) & _M64))
    return key


def hash_uniform(key: int, counter: np.ndarray) -> np.ndarray:
    """[N] float64 in [0, 1): a uniform draw per counter value (row number, id), fixed by `key`."""
    bits = splitmix64(np.asarray(counter, dtype=np.uint64) ^ np.uint64(key))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_normal(key: int, counter: np.ndarray) -> np.ndarray:
    """[N] float64 standard normal per counter value (Box–Muller on two hashed uniforms)."""
    u1 = hash_uniform(key, counter)
    u2 = hash_uniform(_splitmix64_int(key ^ 0x5DEECE66D), counter)
    return np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * math.pi * u2)


def zipf_ids(u: np.ndarray, num_ids: int, exponent: float) -> np.ndarray:
    """Map uniforms to ids 1..num_ids with P(id = k) ≈ ∝ k^-exponent (truncated continuous power law).

    Inverse CDF of the density ∝ x^-s on [1, num_ids + 1), floored: exact in the tail, close for the
    first ranks; no table of size num_ids is needed.

    Args:
        u: [N] uniforms in [0, 1).
        num_ids: largest id (>= 1).
        exponent: s > 0.

    Returns:
        [N] int64 ids in [1, num_ids].
    """
    top = num_ids + 1.0
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(u * math.log(top))
    else:
        a = 1.0 - exponent
        x = np.power(1.0 + u * (top**a - 1.0), 1.0 / a)
    return np.clip(np.floor(x), 1, num_ids).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# generator


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the synthetic dataset (all recorded in schema.source["params"]).

    Attributes:
        rows: examples to generate.
        num_sparse: sparse features C1..C<num_sparse>.
        num_dense: dense features D1..D<num_dense>.
        cardinality: ids per table, OOV id 0 included: one int for all tables or one per table.
        zipf_exponent: skew of the id distribution (Criteo's is about 1.1).
        signal_fraction: share of the sparse (and dense) features that enter the planted logit.
        interaction_rank: rank of the planted FM interaction (0: none).
        first_order_scale: standard deviation of the planted first-order logit term.
        interaction_scale: standard deviation of the interaction term (uniform ids).
        dense_scale: standard deviation of the dense term.
        base_ctr: click rate at logit offset zero (the realised rate is near it).
        oov_rate: probability that a field holds the OOV id 0.
        seed: everything derives from it.
        chunk_rows: rows generated at once (memory only; the output does not depend on it).
    """

    rows: int = 200_000
    num_sparse: int = 26
    num_dense: int = 13
    cardinality: int | tuple[int, ...] = 10_000
    zipf_exponent: float = 1.1
    signal_fraction: float = 0.5
    interaction_rank: int = 4
    first_order_scale: float = 1.0
    interaction_scale: float = 0.5
    dense_scale: float = 0.5
    base_ctr: float = 0.25
    oov_rate: float = 0.01
    seed: int = 0
    chunk_rows: int = 65_536
    cardinalities: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        card = self.cardinality
        cards = (int(card),) * self.num_sparse if isinstance(card, int) else tuple(int(c) for c in card)
        if len(cards) == 1 and self.num_sparse != 1:
            cards = cards * self.num_sparse
        checks = [
            (self.rows >= 0, f"rows must be >= 0, got {self.rows}"),
            (self.num_sparse >= 1, f"num_sparse must be >= 1, got {self.num_sparse}"),
            (self.num_dense >= 0, f"num_dense must be >= 0, got {self.num_dense}"),
            (len(cards) == self.num_sparse, f"cardinality: {len(cards)} values for {self.num_sparse} tables"),
            (all(c >= 1 for c in cards), f"cardinality must be >= 1, got {cards}"),
            (self.zipf_exponent > 0, f"zipf_exponent must be > 0, got {self.zipf_exponent}"),
            (
                0 <= self.signal_fraction <= 1,
                f"signal_fraction must be in [0, 1], got {self.signal_fraction}",
            ),
            (self.interaction_rank >= 0, f"interaction_rank must be >= 0, got {self.interaction_rank}"),
            (0 < self.base_ctr < 1, f"base_ctr must be in (0, 1), got {self.base_ctr}"),
            (0 <= self.oov_rate <= 1, f"oov_rate must be in [0, 1], got {self.oov_rate}"),
            (self.chunk_rows >= 1, f"chunk_rows must be >= 1, got {self.chunk_rows}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"synthetic: {message}")
        object.__setattr__(self, "cardinalities", cards)

    def params(self) -> dict:
        """JSON-able parameters (cardinalities expanded per table)."""
        out = asdict(self)
        out["cardinality"] = list(self.cardinalities)
        del out["cardinalities"]
        return out


class SyntheticGenerator:
    """Generates rows [start, stop) of the synthetic dataset on demand.

    Args:
        config: the dataset parameters.
    """

    def __init__(self, config: SyntheticConfig):
        self.config = c = config
        self.sparse_names = [f"C{i}" for i in range(1, c.num_sparse + 1)]
        self.dense_names = [f"D{i}" for i in range(1, c.num_dense + 1)]
        # Structure (which features carry signal, dense means and weights) comes from a seeded NumPy
        # generator: it is small and fixed per seed. Per-row and per-id draws are hashes.
        rng = np.random.default_rng([c.seed, 0x5E7])
        num_signal = round(c.signal_fraction * c.num_sparse)
        self.signal_fields = sorted(rng.permutation(c.num_sparse)[:num_signal].tolist())
        num_signal_dense = round(c.signal_fraction * c.num_dense)
        self.signal_dense = (
            sorted(rng.permutation(c.num_dense)[:num_signal_dense].tolist()) if c.num_dense else []
        )
        self.dense_mu = rng.uniform(0.5, 3.0, size=c.num_dense)
        self.dense_weight = np.zeros(c.num_dense)
        if self.signal_dense:
            w = rng.normal(
                0.0, c.dense_scale / math.sqrt(len(self.signal_dense)), size=len(self.signal_dense)
            )
            self.dense_weight[self.signal_dense] = w
        self.weight_std = c.first_order_scale / math.sqrt(max(1, num_signal))
        num_pairs = num_signal * (num_signal - 1) // 2
        rank = c.interaction_rank
        self.embed_std = (c.interaction_scale**2 / (num_pairs * rank)) ** 0.25 if num_pairs and rank else 0.0
        self.bias = math.log(c.base_ctr / (1.0 - c.base_ctr))

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema(
            [pa.field("label", pa.int8())]
            + [pa.field(n, pa.int64()) for n in self.sparse_names]
            + [pa.field(n, pa.float32()) for n in self.dense_names]
        )

    def extra(self) -> dict:
        return {
            "signal_fields": [self.sparse_names[i] for i in self.signal_fields],
            "noise_fields": [n for i, n in enumerate(self.sparse_names) if i not in self.signal_fields],
            "signal_dense": [self.dense_names[i] for i in self.signal_dense],
            "dense_weights": {n: float(w) for n, w in zip(self.dense_names, self.dense_weight) if w},
            "model": "label ~ Bernoulli(sigmoid(bias + sum w_f(id_f) + FM(e_f(id_f)) + sum a_d z_d))",
        }

    def _key(self, *parts: int | str) -> int:
        return mix_key(self.config.seed, *parts)

    def generate(self, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) as a table: label int8, C* int64 ids in [0, cardinality), D* float32."""
        c = self.config
        rows = np.arange(start, stop, dtype=np.uint64)
        logit = np.full(len(rows), self.bias)
        columns: dict[str, np.ndarray] = {}
        rank = c.interaction_rank if self.embed_std else 0
        embed_sum = np.zeros((rank, len(rows)))
        embed_sq = np.zeros((rank, len(rows)))
        for f, name in enumerate(self.sparse_names):
            card = c.cardinalities[f]
            if card > 1:
                ids = zipf_ids(hash_uniform(self._key("id", f), rows), card - 1, c.zipf_exponent)
                if c.oov_rate > 0:
                    ids[hash_uniform(self._key("oov", f), rows) < c.oov_rate] = 0
            else:
                ids = np.zeros(len(rows), np.int64)
            columns[name] = ids
            if f in self.signal_fields:
                # Per-id draws are made once per distinct id of the chunk (Zipf: far fewer than rows).
                distinct, inverse = np.unique(ids, return_inverse=True)
                distinct = distinct.astype(np.uint64)
                logit += self.weight_std * hash_normal(self._key("weight", f), distinct)[inverse]
                for j in range(rank):
                    e = self.embed_std * hash_normal(self._key("embed", f, j), distinct)[inverse]
                    embed_sum[j] += e
                    embed_sq[j] += e * e
        if rank:
            # FM identity: sum over pairs <e_f, e_g> = ½ (|Σ e|² − Σ |e|²), per row.
            logit += 0.5 * (embed_sum**2 - embed_sq).sum(axis=0)
        dense: dict[str, np.ndarray] = {}
        for d, name in enumerate(self.dense_names):
            z = hash_normal(self._key("dense", d), rows)
            dense[name] = np.log1p(np.floor(np.exp(self.dense_mu[d] + z))).astype(np.float32)
            logit += self.dense_weight[d] * z
        prob = 1.0 / (1.0 + np.exp(-logit))
        labels = (hash_uniform(self._key("label"), rows) < prob).astype(np.int8)
        arrays = [pa.array(labels)] + [pa.array(columns[n]) for n in self.sparse_names]
        arrays += [pa.array(dense[n]) for n in self.dense_names]
        return pa.Table.from_arrays(arrays, schema=self.arrow_schema)

    def chunks(self):
        """Yield (first row, table) over all rows, `chunk_rows` at a time."""
        c = self.config
        for start in range(0, c.rows, c.chunk_rows):
            yield start, self.generate(start, min(c.rows, start + c.chunk_rows))
