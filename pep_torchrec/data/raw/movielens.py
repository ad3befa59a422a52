"""MovieLens 100K and 1M: ratings joined with their user and item side tables.

`--raw` is the dataset directory; each file may be plain or gzip (`u.data` or `u.data.gz`; the content
is sniffed). The variant is recognised from the files present:

- ml-100k: `u.data` (tab-separated ``user item rating timestamp``), `u.user` (``id|age|gender|
  occupation|zip``), `u.item` (``id|title|release date|video date|url|`` + 19 genre flags, latin-1),
  `u.genre` optional (``name|index``; the standard 19 names are built in).
- ml-1m: `ratings.dat` (``UserID::MovieID::Rating::Timestamp``), `users.dat` (``UserID::Gender::Age::
  Occupation::Zip-code``), `movies.dat` (``MovieID::Title::Genres`` with genres ``A|B``, latin-1).

Labels follow the paper: rating 3 is dropped (counted as filtered, not rejected), > 3 is 1, < 3 is 0.
Sparse features, the same for both variants: user_id, item_id, age, gender, occupation, zip (the full
string), and genres, a multi-hot feature (a bag of genre names per movie; a movie without genre has an
empty bag). No dense features. The temporal split orders rows by timestamp.

The ratings file is streamed; the side tables (a few thousand lines) are read whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pep_torchrec.data.raw.readers import (
    DEFAULT_BLOCK_SIZE,
    UINT_PATTERN,
    DatasetReader,
    DelimitedFile,
    FeatureSpec,
    ParsedBlock,
    RawBlock,
    RowChecks,
    SourceFile,
    find_one,
    iter_line_chunks,
    matches,
    to_int64,
)
from pep_torchrec.data.raw.rejections import PrepareError, Reject

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
USER_FEATURES = ["age", "gender", "occupation", "zip"]
FEATURES = ["user_id", "item_id", *USER_FEATURES, "genres"]
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


@dataclass(frozen=True)
class _Variant:
    name: str
    ratings: str
    users: str
    items: str
    separator: str  # of every file of the variant
    user_columns: tuple[str, ...]  # field order in the users file


ML_100K = _Variant(
    "ml-100k", "u.data", "u.user", "u.item", "|", ("user_id", "age", "gender", "occupation", "zip")
)
ML_1M = _Variant("ml-1m", "ratings.dat", "users.dat", "movies.dat", "::", ("user_id", "gender", "age", "occupation", "zip"))  # fmt: skip


@dataclass
class _SideTable:
    """Rows of a side table sorted by id: ids [M] int64, columns name → [M] Arrow array."""

    ids: np.ndarray
    columns: dict[str, pa.Array]

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id in this table, and whether it is there at all."""
        if len(self.ids) == 0:
            return np.zeros(len(ids), np.int64), np.zeros(len(ids), bool)
        pos = np.minimum(np.searchsorted(self.ids, ids), len(self.ids) - 1)
        return pos, self.ids[pos] == ids


def _read_lines(path: Path, block_size: int, source: SourceFile | None) -> tuple[list[str], list[Reject]]:
    """All lines of a small latin-1 file (gzip or plain) and its file-level rejects."""
    lines: list[str] = []
    rejects: list[Reject] = []
    for chunk in iter_line_chunks(path, block_size, source):
        if chunk.broken is not None:  # the lines salvaged before the break follow
            rejects.append(Reject("broken_gzip", np.array([chunk.first_line]), chunk.broken))
            continue
        lines += chunk.data.decode("latin-1").splitlines()
    if not lines:
        rejects.append(Reject("empty_file", np.array([1]), "no data line"))
    return lines, rejects


class MovieLensReader(DatasetReader):
    """A MovieLens 100K/1M directory → blocks of ratings with user and item side features.

    Args:
        raw: the dataset directory.
        block_size: decompressed bytes of the ratings file read per block.
    """

    name = "movielens"
    default_min_count = 1
    temporal_key = "timestamp"

    def __init__(self, raw: str | os.PathLike, block_size: int = DEFAULT_BLOCK_SIZE):
        super().__init__(block_size)
        self.directory = Path(raw)
        if not self.directory.is_dir():
            raise PrepareError(f"{raw}: not a directory (--raw for movielens is the dataset directory)")
        have_100k = find_one(self.directory, ML_100K.ratings, required=False) is not None
        have_1m = find_one(self.directory, ML_1M.ratings, required=False) is not None
        if have_100k == have_1m:
            what = "both" if have_100k else "neither"
            raise PrepareError(
                f"{raw}: {what} of u.data (ml-100k) and ratings.dat (ml-1m) found; cannot tell the variant"
            )
        self.variant = ML_100K if have_100k else ML_1M
        v = self.variant
        self.ratings_path = find_one(self.directory, v.ratings)
        self.users_path = find_one(self.directory, v.users)
        self.items_path = find_one(self.directory, v.items)
        self.genres_path = find_one(self.directory, "u.genre", required=False) if v is ML_100K else None
        self._genre_names: list[str] = []

    @property
    def sparse_features(self) -> list[FeatureSpec]:
        return [FeatureSpec(n, multi_hot=(n == "genres")) for n in FEATURES]

    @property
    def dense_features(self) -> list[str]:
        return []

    def extra(self) -> dict:
        return {
            "variant": self.variant.name,
            "label_rule": "rating > 3 -> 1, rating < 3 -> 0, rating 3 dropped",
            "genres": list(self._genre_names),
        }

    # -- side tables ---------------------------------------------------------------------------------

    def _read_users(self, source: SourceFile | None) -> tuple[_SideTable, list[Reject]]:
        v = self.variant
        lines, rejects = _read_lines(self.users_path, self.block_size, source)
        rows: dict[int, list[str]] = {}
        bad_lines, first_detail = [], ""
        for number, line in enumerate(lines, start=1):
            fields = line.split(v.separator)
            detail = ""
            if len(fields) != len(v.user_columns):
                detail = f"expected {len(v.user_columns)} fields, found {len(fields)}"
            elif not fields[0].isdigit():
                detail = f"user id {fields[0]!r} is not an integer"
            elif int(fields[0]) in rows:
                detail = f"duplicate user id {fields[0]}"
            elif not fields[v.user_columns.index("age")].isdigit():  # a number (ml-1m: an age code)
                detail = f"age {fields[v.user_columns.index('age')]!r} is not an integer"
            if detail:
                bad_lines.append(number)
                first_detail = first_detail or detail
                continue
            rows[int(fields[0])] = fields
        if bad_lines:
            rejects.append(Reject("bad_user_row", np.array(bad_lines), first_detail))
        ids = np.array(sorted(rows), dtype=np.int64)
        columns = {
            name: pa.array([rows[i][v.user_columns.index(name)] for i in ids.tolist()], pa.string())
            for name in USER_FEATURES
        }
        return _SideTable(ids, columns), rejects

    def _read_items(self, sources: list[SourceFile] | None) -> tuple[_SideTable, list[tuple[str, Reject]]]:
        v = self.variant
        rejects: list[tuple[str, Reject]] = []
        genre_names = ML100K_GENRES
        if self.genres_path is not None:
            source = SourceFile(str(self.genres_path.resolve()), "genres") if sources is not None else None
            lines, file_rejects = _read_lines(self.genres_path, self.block_size, source)
            rejects += [(str(self.genres_path), r) for r in file_rejects]
            names = [ln.split("|")[0] for ln in lines if ln.strip()]
            if len(names) != len(ML100K_GENRES):
                raise PrepareError(f"{self.genres_path}: {len(names)} genres, expected {len(ML100K_GENRES)}")
            genre_names = names
            if sources is not None:
                sources.append(source)
        source = SourceFile(str(self.items_path.resolve()), "items") if sources is not None else None
        lines, file_rejects = _read_lines(self.items_path, self.block_size, source)
        if sources is not None:
            sources.append(source)
        rejects += [(str(self.items_path), r) for r in file_rejects]
        rows: dict[int, list[str]] = {}
        bad_lines, first_detail = [], ""
        seen_genres: dict[str, None] = {}
        for number, line in enumerate(lines, start=1):
            fields = line.split(v.separator)
            detail, genres = "", []
            if v is ML_100K:
                flags = fields[5:]
                if len(fields) != 5 + len(genre_names):
                    detail = f"expected {5 + len(genre_names)} fields, found {len(fields)}"
                elif any(f not in ("0", "1") for f in flags):
                    detail = f"genre flags {flags} are not all 0/1"
                else:
                    genres = [g for g, f in zip(genre_names, flags) if f == "1"]
            elif len(fields) < 3:
                detail = f"expected 3 fields, found {len(fields)}"
            else:
                genres = [g for g in fields[-1].split("|") if g]
            if not detail and not fields[0].isdigit():
                detail = f"movie id {fields[0]!r} is not an integer"
            elif not detail and int(fields[0]) in rows:
                detail = f"duplicate movie id {fields[0]}"
            if detail:
                bad_lines.append(number)
                first_detail = first_detail or detail
                continue
            rows[int(fields[0])] = genres
            seen_genres.update(dict.fromkeys(genres))
        if bad_lines:
            rejects.append((str(self.items_path), Reject("bad_item_row", np.array(bad_lines), first_detail)))
        self._genre_names = list(genre_names) if v is ML_100K else sorted(seen_genres)
        ids = np.array(sorted(rows), dtype=np.int64)
        genres = pa.array([rows[i] for i in ids.tolist()], pa.list_(pa.string()))
        return _SideTable(ids, {"genres": genres}), rejects

    # -- ratings -------------------------------------------------------------------------------------

    def _empty_block(self, path: str, rejects: list[Reject]) -> ParsedBlock:
        sparse = {n: pa.array([], pa.string()) for n in FEATURES if n != "genres"}
        sparse["genres"] = pa.array([], pa.list_(pa.string()))
        empty = np.empty(0, np.int64)
        return ParsedBlock(np.empty(0, np.int8), sparse, {}, empty, path, order_keys=empty, rejects=rejects)

    def blocks(self, *, hash_files: bool = False) -> Iterator[ParsedBlock]:
        sources: list[SourceFile] | None = [] if hash_files else None
        ratings_source = SourceFile(str(self.ratings_path.resolve()), "ratings") if hash_files else None
        users_source = SourceFile(str(self.users_path.resolve()), "users") if hash_files else None
        users, user_rejects = self._read_users(users_source)
        items, item_rejects = self._read_items(sources)
        if user_rejects:
            yield self._empty_block(str(self.users_path), user_rejects)
        for path, reject in item_rejects:
            yield self._empty_block(path, [reject])
        if self.variant is ML_100K:
            reader = DelimitedFile(
                self.ratings_path,
                RATING_COLUMNS,
                delimiter=b"\t",
                block_size=self.block_size,
                source=ratings_source,
            )
        else:
            reader = DelimitedFile(
                self.ratings_path,
                RATING_COLUMNS,
                delimiter=b"\x1f",
                multi_byte_delimiter=b"::",
                block_size=self.block_size,
                source=ratings_source,
            )
        for raw in reader.blocks():
            yield self._parse(raw, str(self.ratings_path), users, items)
        self.rows_read = reader.data_lines
        if hash_files:
            self.sources = [ratings_source, users_source, *sources]

    def _parse(self, raw: RawBlock, path: str, users: _SideTable, items: _SideTable) -> ParsedBlock:
        table = raw.table
        checks = RowChecks(raw.lines)
        col = {n: table.column(n).combine_chunks() for n in RATING_COLUMNS}
        checks.check(
            "bad_label",
            matches(col["rating"], "^[1-5]$"),
            lambda i: f"rating {col['rating'][i].as_py()!r} is not an integer in 1..5",
        )
        for name in ("user_id", "item_id"):
            checks.check(
                "bad_id",
                matches(col[name], UINT_PATTERN),
                lambda i, name=name: f"{name} {col[name][i].as_py()!r} is not an integer",
            )
        checks.check(
            "bad_timestamp",
            matches(col["timestamp"], UINT_PATTERN),
            lambda i: f"timestamp {col['timestamp'][i].as_py()!r} is not an integer",
        )
        user = to_int64(col["user_id"], checks.alive)
        item = to_int64(col["item_id"], checks.alive)
        user_pos, user_found = users.positions(user)
        item_pos, item_found = items.positions(item)
        checks.check(
            "unknown_user", user_found, lambda i: f"user {int(user[i])} is not in {self.users_path.name}"
        )
        checks.check(
            "unknown_item", item_found, lambda i: f"item {int(item[i])} is not in {self.items_path.name}"
        )
        rating = to_int64(col["rating"], checks.alive)
        neutral = checks.alive & (rating == 3)
        keep = checks.alive & ~neutral

        sparse: dict[str, pa.Array] = {
            "user_id": pc.cast(pa.array(user[keep]), pa.string()),
            "item_id": pc.cast(pa.array(item[keep]), pa.string()),
        }
        user_rows = pa.array(user_pos[keep])
        for name in USER_FEATURES:
            sparse[name] = users.columns[name].take(user_rows)
        sparse["genres"] = items.columns["genres"].take(pa.array(item_pos[keep]))
        return ParsedBlock(
            labels=(rating[keep] > 3).astype(np.int8),
            sparse=sparse,
            dense={},
            records=raw.lines[keep] - 1,
            path=path,
            order_keys=to_int64(col["timestamp"], keep)[keep],
            rejects=raw.rejects + checks.rejects,
            filtered={"neutral_rating": int(neutral.sum())},
        )
