"""Reading raw files: blocks of checked rows, and what was rejected and why.

- `readers.py`: the shared machinery (plain or gzip text in bounded blocks, line and value checks,
  input hashing) and the `DatasetReader` interface;
- `criteo.py`, `avazu.py`, `movielens.py`: the built-in datasets' formats;
- `spec_reader.py`: the input of a dataset spec (delimited, libsvm, libffm, Parquet; joins);
- `rejections.py`: the reasons rows are rejected, their log, and `PrepareError`.

`pep_torchrec.data.prepare` turns these blocks into a prepared dataset.
"""
