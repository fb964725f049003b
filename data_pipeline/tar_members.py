"""The members of a tar shard (plain, gzip, bzip2 or xz), each checked against a byte
cap from its header before its data is read: a member over the cap is streamed past,
never held in memory (``megabatch.data_pipeline.limits``).

Compression is recognised from the first bytes and undone by gzip's, bz2's or lzma's
readers, which never return more than asked; tarfile then reads a plain stream.
tarfile's own compressed stream mode (``r|*``, what WebDataset uses) inflates a whole
compressed block at a time and copies what is left of it at every read: skipping a
member of zeros (1000:1 in gzip) then costs time quadratic in the ratio, and the
inflated block alone can reach megabytes.

tarfile reads the data of a pax or GNU long-name header (metadata for the member after
it) into memory before anyone sees it: those headers are held to the same cap, and one
over it ends the shard (``OversizedHeader``, a ``tarfile.ReadError``).
"""

from __future__ import annotations

import bz2
import functools
import gzip
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

from megabatch.data_pipeline.limits import DEFAULT_MAX_MEMBER_BYTES

# (magic bytes, reader) for the compressions a shard may have.
_COMPRESSIONS = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
_MAGIC_BYTES = 6
# Header types whose data tarfile reads into memory itself (pax, GNU long names).
_EXTENDED_HEADERS = frozenset({tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK,
                               tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE})  # fmt: skip


# What reading a broken tar raises: a missing or unreadable file, a failed command, a
# truncated or corrupt tar or compressed stream.
READ_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)


class OversizedHeader(tarfile.ReadError):
    """A pax or long-name header's data is over the member cap: the shard ends here."""


class _Prefixed:
    """A forward-only stream whose first bytes were already read (to see the magic)."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.stream.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data


def plain_stream(stream: BinaryIO):
    """``stream`` (positioned at its start) as the plain tar bytes: through a
    decompressing reader when its first bytes say gzip, bzip2 or xz. A seekable stream
    stays seekable (gzip's reader seeks forward by inflating)."""
    head = stream.read(_MAGIC_BYTES)
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(0)
        raw = stream
    else:
        raw = _Prefixed(head, stream)
    for magic, reader in _COMPRESSIONS:
        if head.startswith(magic):
            return reader(raw)
    return raw


@functools.cache
def capped_tarinfo(max_member_bytes: int) -> type[tarfile.TarInfo]:
    """A TarInfo class for ``tarfile.open(tarinfo=...)`` that refuses pax and long-name
    headers of more than ``max_member_bytes`` before tarfile reads their data."""

    class CappedTarInfo(tarfile.TarInfo):
        # _proc_member is tarfile's dispatch on the header type (Python 3.8 to 3.13):
        # the one place to see a header's size before its data is read.
        def _proc_member(self, tar):
            if self.type in _EXTENDED_HEADERS and self.size > max_member_bytes:
                raise OversizedHeader(
                    f"extended header of {self.size} bytes, over the {max_member_bytes}-byte "
                    "member cap (max_member_bytes)"
                )
            return super()._proc_member(tar)

    return CappedTarInfo


def tar_members(
    stream: BinaryIO, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[tuple[str, bytes | None, int]]:
    """(name, data, size) for each regular file of the tar ``stream``, in order, read
    forward only (a pipe will do). ``data`` is None for a member of more than
    ``max_member_bytes``: tarfile streams past it to the next header."""
    tar = tarfile.open(fileobj=plain_stream(stream), mode="r|",
                       tarinfo=capped_tarinfo(max_member_bytes))  # fmt: skip
    with tar:
        for info in tar:
            if info.isreg():
                if info.size > max_member_bytes:
                    yield info.name, None, info.size
                else:
                    yield info.name, tar.extractfile(info).read(), info.size
            tar.members = []  # stream mode keeps every TarInfo otherwise
