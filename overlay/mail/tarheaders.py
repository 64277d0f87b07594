"""Bounds on a received tar's headers, checked as tarfile reads each one.

Python's tarfile reads a whole PAX extended header ('x', 'g') or GNU long name ('L', 'K')
into memory when it lists the members, whatever size its header says: a 200 MB PAX
header cost about 1 GB of memory and 2 s of CPU, and a download starts by itself, so a
stranger could exhaust a receiver's memory with one message. The old GNU sparse formats
likewise build a map from the member's data ('S' headers chained without end, the 1.0
map's numbers). `bounded_tarinfo()` gives the TarInfo class to open an archive with: its
`frombuf` (tarfile's public hook, called for every 512-byte header before the header's
data is read) refuses an extended header over MAX_EXTENDED_HEADER, more than
MAX_CHAINED of them before one member, more than MAX_GLOBAL_HEADERS global ones, and a
sparse member. Checking where tarfile reads, rather than in a scan of our own, needs no
copy of tarfile's offset rules (a PAX `size`, the types whose size field is not data),
which a scan would have to match exactly or be walked past.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import Self

# Our own sender's longest member name (MAX_PATH_BYTES, 4000 bytes of UTF-8) takes a PAX
# header of about 4 KiB; GNU tar's and bsdtar's are as small. 16 times that is no
# constraint on a real archive and bounds what one header costs.
MAX_EXTENDED_HEADER = 64 * 1024
MAX_CHAINED = 4  # a PAX header, a GNU long name and long link name: 3 before one member
MAX_GLOBAL_HEADERS = 8
_EXTENDED = {tarfile.XHDTYPE: "PAX", tarfile.SOLARIS_XHDTYPE: "PAX",
             tarfile.XGLTYPE: "global PAX", tarfile.GNUTYPE_LONGNAME: "GNU long name",
             tarfile.GNUTYPE_LONGLINK: "GNU long link name"}


class HeaderRefused(Exception):
    """A header breaks a bound; the text says which and how."""


@dataclass
class _Seen:
    chained: int = 0
    globals: int = 0

    def check(self, info: tarfile.TarInfo) -> None:
        kind = _EXTENDED.get(info.type)
        if info.size < 0:  # a base-256 size field can say so; tarfile would read with it
            raise HeaderRefused(f"{info.name!r}: a negative size")
        if info.type == tarfile.GNUTYPE_SPARSE:
            raise HeaderRefused(f"{info.name!r}: a sparse file (not unpacked)")
        if kind is None:
            self.chained = 0
            return
        if info.size > MAX_EXTENDED_HEADER:
            raise HeaderRefused(f"a {kind} header of {_size(info.size)} (at most "
                                f"{_size(MAX_EXTENDED_HEADER)})")
        self.chained += 1
        if self.chained > MAX_CHAINED:
            raise HeaderRefused(f"more than {MAX_CHAINED} extended headers before one "
                                "member")
        if info.type == tarfile.XGLTYPE:
            self.globals += 1
            if self.globals > MAX_GLOBAL_HEADERS:
                raise HeaderRefused(f"more than {MAX_GLOBAL_HEADERS} global PAX headers")


def _size(n: int) -> str:
    return f"{n / 1024:,.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):,.1f} MiB"


def bounded_tarinfo() -> type[tarfile.TarInfo]:
    """A TarInfo class for reading one archive (`tarfile.open(..., tarinfo=it)`): any
    header breaking a bound raises HeaderRefused before its data is read."""
    seen = _Seen()

    class BoundedTarInfo(tarfile.TarInfo):
        @classmethod
        def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
            info = super().frombuf(buf, encoding, errors)
            seen.check(info)
            return info

        def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                               tarfile: tarfile.TarFile) -> None:
            # The PAX sparse 1.0 map is read from the member's data, number by number,
            # into a list as long as the data allows: tarfile's only reader of it.
            name = pax_headers.get("GNU.sparse.name", next.name)
            raise HeaderRefused(f"{name!r}: a sparse file (not unpacked)")

    return BoundedTarInfo
