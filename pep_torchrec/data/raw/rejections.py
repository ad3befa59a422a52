"""What reading raw files rejects: errors, and rejected rows per reason (counted into report.json by
`pep_torchrec.data.prepare`).

Reasons a raw row (or file) is rejected, as counted in report.json["rows_rejected"]:

    wrong_field_count   the line does not have the expected number of delimited fields
                        (an empty line is one field, so it lands here too)
    bad_encoding        the line is not valid UTF-8, or holds a stray carriage return
    line_too_long       the line is longer than 1 MiB (`readers.MAX_LINE_BYTES`; skipped without being held)
    nul_byte            the line holds a NUL byte
    value_too_long      a value is longer than 1,024 characters (`schema.MAX_VALUE_CHARS`: the service
                        refuses such values, so no vocabulary entry may be one)
    bad_label           Criteo/Avazu label not "0"/"1"; MovieLens rating not an integer in 1..5
    bad_integer         a Criteo integer feature I1..I13 is neither empty nor an integer ("-1" is valid)
    bad_hour            Avazu `hour` is not a valid YYMMDDHH
    bad_id, bad_timestamp, unknown_user, unknown_item
                        MovieLens ratings: non-integer ids or timestamp, users/items absent from the
                        side tables
    bad_user_row, bad_item_row, bad_side_row
                        (side-table lines) malformed MovieLens users/items lines; unusable lines of a
                        spec's side table (see pep_torchrec/data/raw/spec_reader.py for the spec's reasons)
    broken_gzip         (files) a truncated or corrupt gzip stream; the rows before the break are kept
    empty_file          (files) a file without any data line (a header alone is not data)

Rows that are well formed but not part of the dataset by definition (MovieLens rating 3) are *filtered*,
not rejected, and counted separately. So rows read = rows kept + rows rejected (the row reasons only:
`RejectionLog.rejected_rows`, report.json["rows_rejected_total"]) + rows filtered.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from pep_torchrec.utils.errors import UserError

#: Reasons whose count is a number of files, not of rows.
FILE_REASONS = ("broken_gzip", "empty_file")
#: Reasons that count lines of side tables (MovieLens users/items), not rows of the main input.
SIDE_TABLE_REASONS = ("bad_user_row", "bad_item_row", "bad_side_row")


class PrepareError(UserError):
    """The raw input or the options cannot produce a prepared dataset; the message says why and where."""


class MalformedRowError(PrepareError):
    """`--strict`: the first malformed row (or file), as `path:line: reason: detail`."""

    def __init__(self, path: str, line: int, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        super().__init__(f"{path}:{line}: {reason}: {detail}")


@dataclass(frozen=True)
class Reject:
    """Rows of one block rejected for one reason.

    Attributes:
        reason: one of the reasons in this module's docstring.
        lines: 1-based line numbers in the raw file, ascending.
        detail: what is wrong with the first of them (names the field and value).

    A file-level reason (`FILE_REASONS`) counts as one, whatever `lines` holds (the line of the break).
    """

    reason: str
    lines: np.ndarray
    detail: str

    @property
    def count(self) -> int:
        return 1 if self.reason in FILE_REASONS else int(len(self.lines))

    @property
    def first_line(self) -> int:
        return int(self.lines[0])


class RejectionLog:
    """Counts rejected and filtered rows per reason; in strict mode raises at the first rejection.

    Rejections are recorded one block at a time: the checks of a block run vectorised, so the
    first malformed row of the block is the one with the smallest line number over all reasons.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.rejected: Counter[str] = Counter()
        self.filtered: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def record(self, path: str, rejects: list[Reject]) -> None:
        """Count `rejects` (all from the same file); strict mode: raise for the earliest line.

        Raises:
            MalformedRowError: in strict mode, if `rejects` is not empty.
        """
        rejects = [r for r in rejects if len(r.lines)]
        if not rejects:
            return
        if self.strict:
            first = min(rejects, key=lambda r: r.first_line)
            raise MalformedRowError(path, first.first_line, first.reason, first.detail)
        for r in sorted(rejects, key=lambda r: r.first_line):
            self.rejected[r.reason] += r.count
            self.examples.setdefault(r.reason, f"{path}:{r.first_line}: {r.detail}")

    def filter(self, reason: str, count: int) -> None:
        if count:
            self.filtered[reason] += int(count)

    @property
    def rejected_rows(self) -> int:
        """Rejected rows of the main input: rows read = rows kept + this + rows filtered."""
        skip = FILE_REASONS + SIDE_TABLE_REASONS
        return sum(n for reason, n in self.rejected.items() if reason not in skip)
