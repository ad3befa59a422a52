"""`pep-torchrec data prepare`: raw files, a dataset spec or the synthetic generator → a prepared dataset
(the format: `pep_torchrec.data.schema`).

- `pipeline.py`: the built-in datasets and the synthetic generator (`prepare_dataset`);
- `from_spec.py`: any tabular data declared in a spec (`prepare_from_spec`);
- `options.py`: `PrepareOptions`, the typed options both take;
- `splits.py`: which split a row goes to, and the writer of a split's Parquet files;
- `output.py`: the output directory, written aside and renamed when complete, and report.json;
- `progress.py`: the progress line of a pass.

`python -m pep_torchrec.data.prepare` is `pep-torchrec data prepare`.
"""

from pep_torchrec.data.prepare.from_spec import prepare_from_spec
from pep_torchrec.data.prepare.options import PrepareOptions, prepare_options, synthetic_config
from pep_torchrec.data.prepare.pipeline import format_summary, prepare_dataset

__all__ = [
    "PrepareOptions",
    "format_summary",
    "prepare_dataset",
    "prepare_from_spec",
    "prepare_options",
    "synthetic_config",
]
