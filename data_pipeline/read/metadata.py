"""Each sample's ``.json`` member, parsed only where somebody reads it.

A batch carries one metadata dict per sample (labels for evaluation, the source's
fields). Parsing them and pickling the dicts to the main process is a measurable part of
a loader worker's time (docs/benchmarks-data.md, "Measurements"), for data that training
never reads. So a worker hands the raw bytes on
(``SampleMetadata``), and they are parsed, once, the first time the batch's metadata is
read, in whichever process reads it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence


class SampleMetadata(Sequence):
    """A batch's metadata: ``meta[i]`` is sample i's ``.json`` as a dict; ``{}`` where the
    sample has none, or one that is not a JSON object (metadata is informational: a bad
    ``.json`` does not cost the sample)."""

    __slots__ = ("_raw", "_parsed")

    def __init__(self, raw: Sequence[bytes | None] = ()):
        self._raw = list(raw)
        self._parsed: list[dict] | None = None

    def _dicts(self) -> list[dict]:
        if self._parsed is None:
            self._parsed = [_parse(item) for item in self._raw]
        return self._parsed

    def __getitem__(self, index):
        return self._dicts()[index]

    def __len__(self) -> int:
        return len(self._raw)

    def __iter__(self) -> Iterator[dict]:
        return iter(self._dicts())

    def __eq__(self, other) -> bool:
        if isinstance(other, SampleMetadata | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"SampleMetadata({self._dicts()!r})"

    def __reduce__(self):  # only the bytes travel; the receiver parses if it reads them
        return SampleMetadata, (self._raw,)


def _parse(raw: bytes | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
