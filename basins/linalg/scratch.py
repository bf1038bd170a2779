"""Row storage for a Lanczos basis that need not live in RAM: a memory-mapped scratch file.

:class:`ScratchRows` holds a ``(rows, P)`` tensor whose pages live in an unlinked temporary file
(so nothing is left behind, even after a crash) and are read back by the OS on demand. After each
column block of a pass over it the pages are released from this process (``madvise(MADV_DONTNEED)``: a shared file
mapping keeps its data in the file and the page cache), so the resident set holds only the
block being worked on; the OS can drop clean pages under memory pressure instead of invoking the
OOM killer. Reading a column block ``[:, a:b]`` touches ``rows`` ranges of ``b - a`` numbers each.
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile

import torch

from basins.errors import InputError

__all__ = ["ScratchRows", "scratch_dir"]


def scratch_dir(path: str | os.PathLike[str] | None = None) -> str:
    """The directory scratch files go to: ``path``, else ``$BASINS_SCRATCH``, else the system's temporary directory."""
    return str(path or os.environ.get("BASINS_SCRATCH") or tempfile.gettempdir())


class ScratchRows:
    """A ``(rows, cols)`` tensor of ``dtype`` backed by an unlinked memory-mapped file in ``directory``.

    Raises:
        InputError: the directory lacks the free space (the message names both sizes).
    """

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, directory: str | None = None) -> None:
        where = scratch_dir(directory)
        size = rows * cols * torch.empty((), dtype=dtype).element_size()
        free = shutil.disk_usage(where).free
        if size > free:
            raise InputError(f"the Lanczos basis needs {size / 2**30:.2f} GiB of scratch space but {where} has "
                             f"{free / 2**30:.2f} GiB free; set BASINS_SCRATCH to a larger disk, or raise memory_bytes")
        fd, name = tempfile.mkstemp(prefix="basins-basis-", suffix=".f32" if dtype == torch.float32 else ".bin",
                                    dir=where)
        try:
            os.unlink(name)  # the mapping keeps the file alive; nothing is left behind
            os.ftruncate(fd, max(size, 1))
            self._map = mmap.mmap(fd, max(size, 1), flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.nbytes = size
        self._cols, self._itemsize = cols, torch.empty((), dtype=dtype).element_size()
        self.tensor = torch.frombuffer(self._map, dtype=dtype, count=rows * cols).view(rows, cols)

    def release(self, rows: int | None = None, start: int = 0, stop: int | None = None) -> None:
        """Drop the mapped pages from this process' resident set (their data stay in the file and the
        page cache). With ``rows``: only columns ``[start, stop)`` of the first ``rows`` rows (the whole
        pages inside each row's range), so that a pass streamed in column blocks keeps one block resident
        (the resident set counts mapped file pages: a whole pass would otherwise hold the basis)."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # pragma: no cover - not Linux/macOS: the OS pages out itself
            return
        try:
            if rows is None:
                self._map.madvise(mmap.MADV_DONTNEED)
                return
            page, stop = mmap.PAGESIZE, self._cols if stop is None else stop
            for r in range(rows):
                lo = -(-(r * self._cols + start) * self._itemsize // page) * page
                hi = (r * self._cols + stop) * self._itemsize // page * page
                if hi > lo:
                    self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # pragma: no cover - madvise refused: the OS pages out itself
            pass
