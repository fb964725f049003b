"""``megabatch embed``'s output: a parquet file written atomically.

Columns: ``key`` (string) and one fixed_size_list<float32>[D] per vector column
(``image_embeds``, ``text_embeds``, ``features``). The schema's metadata, under
``METADATA_KEY``, is JSON saying where the vectors came from (fixed when the file is
opened, at the first batch); the footer's, under ``SKIPPED_KEY``, the skip counts
(known at the end). The file is written as ``.FILE.partial-PID`` beside FILE and renamed
into place when complete (``atomic_write.atomic_file``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

ROWS_PER_GROUP = 4096  # parquet row groups: batches are gathered up to this many rows
METADATA_KEY = b"megabatch.embed"  # the schema's metadata: JSON (embed._metadata)
SKIPPED_KEY = b"megabatch.embed.skipped"  # the footer's, written last: JSON skip counts


class EmbeddingWriter:
    """Rows to a parquet file: ``key`` string, one fixed_size_list<float32>[D] per vector
    column; opened at the first batch (D is the model's), row groups of up to
    ROWS_PER_GROUP rows."""

    def __init__(self, path: Path, metadata: dict):
        self.path, self.metadata = path, metadata
        self.rows = 0
        self._writer = None
        self._pending: list = []  # pyarrow tables not yet written

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._flush()
        if self._writer is not None:
            self._writer.close()

    def add(self, keys: list[str], vectors: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        if self._writer is None:
            self._open(vectors)
        arrays = [pa.array(keys, pa.string())]
        for v in vectors.values():  # (B, D) float32
            flat = pa.array(np.ascontiguousarray(v, dtype=np.float32).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, v.shape[1]))
        self._pending.append(pa.Table.from_arrays(arrays, schema=self._writer.schema))
        self.rows += len(keys)
        if sum(len(t) for t in self._pending) >= ROWS_PER_GROUP:
            self._flush()

    def footer(self, key: bytes, value: dict) -> None:
        """JSON under ``key`` in the file's footer metadata (not the schema's: that was
        written when the file was opened): ``pq.ParquetFile(FILE).metadata.metadata``."""
        self._writer.add_key_value_metadata({key: json.dumps(value).encode()})

    def _open(self, vectors: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for column, v in vectors.items():
            self.metadata["columns"][column]["dimension"] = int(v.shape[1])
        fields = [pa.field("key", pa.string(), nullable=False)]
        fields += [pa.field(c, pa.list_(pa.float32(), int(v.shape[1])), nullable=False)
                   for c, v in vectors.items()]  # fmt: skip
        schema = pa.schema(fields, metadata={METADATA_KEY: json.dumps(self.metadata).encode()})
        self._writer = pq.ParquetWriter(self.path, schema)

    def _flush(self) -> None:
        import pyarrow as pa

        if self._pending:
            self._writer.write_table(pa.concat_tables(self._pending), row_group_size=ROWS_PER_GROUP)
            self._pending = []
