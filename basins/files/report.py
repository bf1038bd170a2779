"""HDF5 reports: one file holds several analyses of one problem.

Layout (``schema_version`` 1)::

    /                      attrs: format="basins-report", schema_version, basins_version,
                                  torch_version, created (ISO 8601, UTC)
    /problem               attrs: model, model_sha256, data, data_sha256, num_params,
                                  num_examples, loss, loss_at_optimum, grad_norm, dtype,
                                  device, seed, batch_size, hvp_route, data_streamed,
                                  data_read_every_pass, world_size, rank_examples,
                                  dist_backend, ...
                           data_sha256: Σᵢ sha256(i, xᵢ, yᵢ) mod 2²⁵⁶ over the examples
                           (basins.engine.data.data_fingerprint): the same for the same
                           examples from any file format or stream, batch size and
                           number of processes
    /<analysis>            one group per analysis (hessian, spectrum, nullity, features,
                           volume, walls); attrs: settings, argv, costs (num_hvps,
                           num_loss_evals), wall_seconds, created, replaced (how many
                           earlier runs this group replaced)
    /<analysis>/<name>     datasets, each with attrs ``description`` and (where
                           meaningful) ``units``

An analysis group is a :class:`basins.record.Record` written out
(:meth:`~basins.record.Record.report_attrs` and its arrays) and read back by
:meth:`~basins.record.Record.from_analysis`: the same record, so ``basins summary --json`` prints
what the writing command printed with ``--json``. Beside the record's own attributes a group holds
``argv``, ``created``, ``replaced``, ``problem`` (the ``/problem`` record of the run that wrote it:
a later run of another seed or device rewrites ``/problem``), ``warnings`` and ``json_only``
(:data:`basins.record.REPORT_ATTRS`). A dataset has attributes ``description``, ``units``
(where meaningful), ``in_json`` (only when False: not a ``--json`` key) and ``json_values`` (only
where the ``--json`` value differs from the dataset, e.g. ragged lists).

Attribute values are the JSON types of :func:`basins.record.plain`, stored so that they read back
exactly: numbers, strings, booleans, non-empty numeric lists of one type as arrays, ``None`` as
an HDF5 empty attribute, anything else as JSON text prefixed ``json:``. Non-finite floats are
kept (``--json`` shows them as null, read back or not). Nothing is pickled.

Writes are atomic: the new file is built beside the target (``.basins-<pid>-*.h5.tmp``),
flushed and moved over it with :func:`os.replace`, so an interrupted run (or a full disk) leaves
the old report as it was; temporaries of writers that were killed (``kill -9``) are removed by
the next write into that directory. Writers to one report take turns (:func:`report_lock`): two
analyses written at once both land. The temporary and the lock file are created with
``O_EXCL``/``O_NOFOLLOW`` and written through their descriptors: a symlink placed at either name
is an error, never followed.

Reading (:func:`read_report`, ``summary``, ``plot``) opens a report without following external or
soft links, virtual datasets or external storage, and bounds declared sizes against the memory
before reading (:mod:`basins.files.hdf5`); JSON attributes are parsed with bounded depth.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from basins._version import __version__
from basins.errors import InputError, ReportError
from basins.record import Array, plain, stored

from .bounds import load_json
from .hdf5 import open_contained

__all__ = ["SCHEMA_VERSION", "FORMAT", "Array", "write_analysis", "read_report", "check_report", "check_writable"]

FORMAT = "basins-report"
SCHEMA_VERSION = 1
_IDENTITY_KEYS = ("model_sha256", "data_sha256", "params")  # params: the --params selection (None: all)
_JSON_PREFIX = "json:"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _to_attr(value: Any) -> Any:
    """The HDF5 attribute for ``value``, taken as JSON types first (:func:`basins.record.plain`,
    non-finite floats kept), so
    that :func:`_from_attr` gives back exactly that: None as an empty attribute, a bool, an int
    (64-bit), a float, a string, a non-empty list of only ints or only floats as a numeric array,
    anything else (mixed or nested lists, dicts, empty lists, a string that begins ``json:``) as
    JSON text prefixed ``json:``."""
    value = plain(value, finite=False)
    if value is None:
        return h5py.Empty("f")
    if isinstance(value, bool):
        return np.bool_(value)
    if isinstance(value, int) and _INT64[0] <= value <= _INT64[1]:
        return np.int64(value)
    if isinstance(value, float) or (isinstance(value, str) and not value.startswith(_JSON_PREFIX)):
        return value
    if isinstance(value, list) and value:
        if all(type(v) is int and _INT64[0] <= v <= _INT64[1] for v in value):
            return np.asarray(value, dtype=np.int64)
        if all(type(v) is float for v in value):
            return np.asarray(value, dtype=np.float64)
    return _JSON_PREFIX + json.dumps(value, ensure_ascii=False)


_INT64 = (-(2**63), 2**63 - 1)


def _from_attr(value: Any) -> Any:
    if isinstance(value, h5py.Empty):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        if not value.startswith(_JSON_PREFIX):
            return value
        try:
            return load_json(value[len(_JSON_PREFIX):], "a report attribute")
        except InputError as err:
            raise ReportError(str(err)) from None
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        obj.attrs[key] = _to_attr(value)


def _open_checked(path: str) -> h5py.File:
    """Open an existing report for reading, checking format and schema version."""
    if not os.path.exists(path):
        raise ReportError(f"report {path!r} does not exist")
    if os.path.isdir(path):
        raise ReportError(f"{path!r} is a directory, not a report")
    f = open_contained(path, repr(path), whole=True, error=ReportError)
    try:
        fmt = _from_attr(f.attrs.get("format"))
        if fmt != FORMAT:
            raise ReportError(f"{path!r} is an HDF5 file but not a basins report (format attribute {fmt!r})")
        version = _from_attr(f.attrs.get("schema_version"))
        if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
            raise ReportError(
                f"{path!r} has report schema version {version!r}; this basins ({__version__}) reads "
                f"versions 1..{SCHEMA_VERSION}: upgrade basins"
            )
    except BaseException:
        f.close()
        raise
    return f


def check_report(path: str) -> None:
    """Raise :class:`ReportError` unless ``path`` is a readable basins report."""
    _open_checked(path).close()


def write_analysis(
    path: str,
    problem: Mapping[str, Any],
    group: str,
    attrs: Mapping[str, Any],
    arrays: Mapping[str, Array] | None = None,
    *,
    subgroup_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    force: bool = False,
) -> None:
    """Write (or replace) analysis ``group`` in the report at ``path``, atomically.

    Args:
        path: the report file; created if missing.
        problem: the ``/problem`` attributes (must include ``model_sha256`` and
            ``data_sha256``: a report of another problem is refused unless ``force``).
        group: the analysis name (``hessian``, ``volume``, ...).
        attrs: the analysis' scalar results and settings.
        arrays: datasets, keyed by name; a key ``"a/b"`` creates subgroup ``a``.
        subgroup_attrs: attributes for subgroups, keyed by their path within ``group``.
        force: overwrite a report of another problem (its other analyses are dropped).

    Raises:
        ReportError: ``path`` exists but is not a basins report, or is of another problem.
    """
    if not group or "/" in group or group == "problem":
        raise ValueError(f"bad analysis group name {group!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ReportError(f"cannot write report {path!r}: directory {directory!r} does not exist")
    try:
        with report_lock(path):
            remove_stale_temporaries(directory)
            _write_locked(path, directory, problem, group, attrs, arrays, subgroup_attrs, force)
    except (OSError, RuntimeError) as err:  # a full disk, a name too long, a symlinked lock: one line
        raise ReportError(f"cannot write report {path!r} ({_os_reason(err)}); the old report, if any, "
                          "is unchanged") from None


def _os_reason(err: BaseException) -> str:
    """What went wrong, in a few words (HDF5's own text is several lines of stack)."""
    code = getattr(err, "errno", None)
    if code is None:
        for candidate in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG):
            if f"errno = {candidate}," in str(err) or f"[Errno {candidate}]" in str(err):
                code = candidate
                break
    if code is not None:
        return os.strerror(code)
    return " ".join(str(err).split())[:160] or type(err).__name__


def _write_locked(path: str, directory: str, problem: Mapping[str, Any], group: str, attrs: Mapping[str, Any],
                  arrays: Mapping[str, Array] | None, subgroup_attrs: Mapping[str, Mapping[str, Any]] | None,
                  force: bool) -> None:
    """The read-modify-replace of :func:`write_analysis`, run while holding the report's lock."""
    old: h5py.File | None = None
    replaced = 0
    if os.path.exists(path):
        old = _open_checked(path)
        old_problem = {k: _from_attr(v) for k, v in old["problem"].attrs.items()} if "problem" in old else {}
        differs = [k for k in _IDENTITY_KEYS if old_problem.get(k) != problem.get(k)]
        if differs and not force:
            old.close()
            raise another_problem(path, differs)
        if differs:
            old.close()
            old = None
        elif group in old:
            replaced = int(_from_attr(old[group].attrs.get("replaced", 0)) or 0) + 1
    # mkstemp: O_CREAT | O_EXCL (| O_NOFOLLOW): a name that exists, a symlink included, is never opened;
    # HDF5 then writes through this descriptor, never reopening the name
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{os.getpid()}-", suffix=_TMP_SUFFIX, dir=directory)
    try:
        os.fchmod(fd, file_mode(path))  # mkstemp makes 0600; keep the old file's mode, else the umask's
        with open(fd, "w+b", closefd=False) as stream, h5py.File(stream, "w") as new:
            _set_attrs(new, {
                "format": FORMAT,
                "schema_version": SCHEMA_VERSION,
                "basins_version": __version__,
                "torch_version": _torch_version(),
                "created": _from_attr(old.attrs["created"]) if old is not None and "created" in old.attrs else _now(),
                "modified": _now(),
            })
            if old is not None:
                for name in old:
                    if name not in (group, "problem"):
                        old.copy(old[name], new, name=name)
            prob = new.create_group("problem", track_order=True)
            _set_attrs(prob, problem)
            g = new.create_group(group, track_order=True)
            _set_attrs(g, {**attrs, "created": _now(), "replaced": replaced})
            for name, arr in (arrays or {}).items():
                _write_array(g, name, arr)
            for sub, sattrs in (subgroup_attrs or {}).items():
                _set_attrs(g.require_group(sub), sattrs)
            new.flush()
            stream.flush()
            os.fsync(fd)
        if old is not None:
            old.close()
            old = None
        if not os.path.samestat(os.fstat(fd), os.lstat(tmp)):
            raise ReportError(f"cannot write report {path!r}: its temporary {tmp!r} was replaced while writing")
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            old.close()
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                os.unlink(tmp)
        raise
    finally:
        os.close(fd)


def _write_array(g: h5py.Group, name: str, arr: Array) -> None:
    """Dataset ``name`` (``"sub/name"``: in subgroup ``sub``) of ``arr`` (:func:`basins.record.stored`),
    with attributes ``description``, ``units`` (when given), ``in_json`` (only when False) and
    ``json_values`` (only when given), which :func:`_read_group` gives back."""
    *subs, leaf = name.split("/")
    for sub in subs:
        g = g[sub] if sub in g else g.create_group(sub, track_order=True)
    ds = g.create_dataset(leaf, data=stored(arr.values))
    ds.attrs["description"] = arr.description
    if arr.units is not None:
        ds.attrs["units"] = arr.units
    if not arr.in_json:
        ds.attrs["in_json"] = np.bool_(False)
    if arr.json_values is not None:
        ds.attrs["json_values"] = _to_attr(arr.json_values)


_TMP_PREFIX = ".basins-"
_TMP_SUFFIX = ".h5.tmp"
#: Seconds a writer waits for another process's write to the same report before giving up.
LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def report_lock(path: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` for a read-modify-replace of the report.

    The lock is ``fcntl.flock`` on a sidecar file ``.<name>.lock`` beside the report (the
    report itself is replaced, so it cannot carry the lock); it holds the writer's pid and is
    removed on release (a waiter that locked the removed file notices and locks anew). A
    second writer waits for the first (both analyses land), up to ``timeout_s`` (default
    :data:`LOCK_TIMEOUT_S`), then fails naming the pid that holds it. The kernel drops the
    lock when a writer dies, even by ``kill -9``. Where ``fcntl`` does not exist (Windows) no
    lock is taken.

    Raises:
        ReportError: the lock was not free within ``timeout_s``.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.lock")
    deadline = time.monotonic() + (LOCK_TIMEOUT_S if timeout_s is None else timeout_s)
    while True:
        fd = _open_lock(lock_path, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if time.monotonic() >= deadline:
                raise ReportError(
                    f"report {path!r} is being written by pid {holder}; wait for it to finish, or write "
                    "to another file"
                ) from None
            time.sleep(0.05)
            continue
        try:  # the holder before us may have removed the file we locked: then lock the new one
            same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock_path)  # while still held: a waiter that locked this inode retries
        os.close(fd)


def _open_lock(lock_path: str, path: str) -> int:
    """Create the lock file (``O_CREAT | O_EXCL | O_NOFOLLOW``), or open the one another writer
    made (``O_NOFOLLOW``): a symlink or anything but a regular file there is an error."""
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
    except FileExistsError:
        pass
    try:
        fd = os.open(lock_path, os.O_RDWR | nofollow | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:  # removed in between by its holder: create it
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | nofollow, 0o644)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ReportError(f"cannot write report {path!r}: its lock file {lock_path!r} is a symbolic link; "
                              "remove it (basins never follows it)") from None
        raise
    if not stat_is_regular(fd):
        os.close(fd)
        raise ReportError(f"cannot write report {path!r}: its lock file {lock_path!r} is not a regular file")
    return fd


def stat_is_regular(fd: int) -> bool:
    import stat

    return stat.S_ISREG(os.fstat(fd).st_mode)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Remove ``.basins-<pid>-*.h5.tmp`` files in ``directory`` whose writer ``pid`` is no longer running.

    They are what a writer killed by ``kill -9`` leaves behind (any other interruption removes
    its own). Temporaries of running processes, and files not named so, are left alone.
    Returns the paths removed.
    """
    removed: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        if not (name.startswith(_TMP_PREFIX) and name.endswith(_TMP_SUFFIX)):
            continue
        pid_text = name[len(_TMP_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or _pid_alive(int(pid_text)):
            continue
        full = os.path.join(directory, name)
        try:
            os.unlink(full)
            removed.append(full)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def file_mode(path: str) -> int:
    """The mode a file written to ``path`` should get: the existing file's, else the umask's
    (``mkstemp``, used for atomic writes, makes 0600)."""
    if os.path.exists(path):
        return os.stat(path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_writable(path: str, problem: Mapping[str, Any], *, force: bool = False) -> None:
    """Raise :class:`ReportError` now if :func:`write_analysis` would refuse ``path`` later.

    Checks, before an expensive analysis, that the directory exists and that an existing
    ``path`` is a readable basins report of the same problem (or ``force``).
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ReportError(f"cannot write report {path!r}: directory {directory!r} does not exist")
    try:
        name_max = os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        name_max = 255
    if len(os.fsencode(os.path.basename(path))) + len(".lock") + 1 > name_max:
        raise ReportError(f"cannot write report {path!r}: its name is longer than the {name_max - 6} bytes "
                          "this file system allows for a report (its lock file adds 6)")
    if not os.path.exists(path):
        return
    with _open_checked(path) as f:
        old = {k: _from_attr(v) for k, v in f["problem"].attrs.items()} if "problem" in f else {}
    differs = [k for k in _IDENTITY_KEYS if old.get(k) != problem.get(k)]
    if differs and not force:
        raise another_problem(path, differs)


def another_problem(path: str, differs: list[str]) -> ReportError:
    """The error for a report of another problem (``differs``: the identity keys that differ),
    which ``force`` would overwrite (``param="force"``: the command line names ``--force``)."""
    return ReportError(f"report {path!r} holds analyses of another problem ({', '.join(differs)} differ); "
                       "write to another file, or pass force=True to replace it", param="force")


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _read_group(g: h5py.Group) -> dict[str, Any]:
    out: dict[str, Any] = {"attrs": {k: _from_attr(v) for k, v in g.attrs.items()}, "datasets": {}, "groups": {}}
    for name, item in g.items():
        if isinstance(item, h5py.Dataset):
            out["datasets"][name] = {
                "values": item[()],
                "description": _from_attr(item.attrs.get("description", "")),
                "units": _from_attr(item.attrs.get("units")) if "units" in item.attrs else None,
                "in_json": bool(_from_attr(item.attrs["in_json"])) if "in_json" in item.attrs else True,
                "json_values": _from_attr(item.attrs["json_values"]) if "json_values" in item.attrs else None,
            }
        else:
            out["groups"][name] = _read_group(item)
    return out


def read_report(path: str) -> dict[str, Any]:
    """Read a whole report into nested dicts.

    Returns:
        ``{"path", "attrs", "problem", "analyses": {name: {"attrs", "datasets": {name:
        {"values" (numpy), "description", "units"}}, "groups": {...}}}}``.

    Raises:
        ReportError: missing, not HDF5, not a basins report, or an unknown schema version.
    """
    with _open_checked(path) as f:
        attrs = {k: _from_attr(v) for k, v in f.attrs.items()}
        problem = {k: _from_attr(v) for k, v in f["problem"].attrs.items()} if "problem" in f else {}
        analyses = {name: _read_group(f[name]) for name in f if name != "problem" and isinstance(f[name], h5py.Group)}
    return {"path": path, "attrs": attrs, "problem": problem, "analyses": analyses}
