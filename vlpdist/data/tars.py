"""Telling a whole tar from a cut one, which `tarfile` does not: it reads a cut, empty or invalid
header past the first one as a normal end of the archive, so a tar cut at (or inside) a header
reads as a shorter whole one. Used by the processing stage on raw shards and by the data plan on
feature shards."""

from __future__ import annotations

import tarfile
from typing import BinaryIO


def end_of_archive_error(file: BinaryIO, offset: int) -> str | None:
    """None when an end-of-archive block (512 zero bytes) lies at `offset` of `file`, the offset
    where tarfile stopped reading headers (`TarFile.offset` once it has read them all); else what
    lies there instead. One zero block proves that every member before it is whole; the second one
    POSIX asks for adds nothing, and a file cut between the two has lost no member."""
    file.seek(offset)
    block = file.read(tarfile.BLOCKSIZE)
    if block == bytes(tarfile.BLOCKSIZE):
        return None
    if len(block) < tarfile.BLOCKSIZE:
        return (f"the archive ends at byte {offset + len(block)}, inside or instead of a member header "
                "(no end-of-archive block)")
    return f"invalid member header at byte {offset}"
