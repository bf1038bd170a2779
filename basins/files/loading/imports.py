"""``module:attribute`` and ``path/to/file.py:attribute`` specs (``arch``, ``data``, ``loss``)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

from basins.engine.losses import BUILTIN_LOSSES, NamedLoss
from basins.errors import InputError

from .describe import one_line


def import_object(spec: str) -> Any:
    """Resolve ``"module:attr"`` (``attr`` may be dotted) to the object it names.

    ``module`` is an importable module (``mypkg.models``) or a path to a Python file
    (``path/to/models.py``). An importable name that is not found is retried with the current
    directory on ``sys.path`` (the ``basins`` console script does not put it there); a file is
    executed as a module named ``basins_user_<stem>`` with its folder on ``sys.path`` while it
    runs. Importing runs the module's code, as ``python -c "import module"`` would.

    Raises:
        InputError: the spec is malformed, or the module or attribute cannot be found or
            imported (the message carries the underlying error).
    """
    module_name, sep, attribute = spec.rpartition(":")
    if not sep or not module_name or not attribute:
        raise InputError(
            f"{spec!r} is not of the form module:attribute (e.g. mypkg.models:make_model or "
            "path/to/models.py:make_model)"
        )
    if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
        module = _import_file(module_name, spec)
    else:
        module = _import_module(module_name, spec)
    obj: Any = module
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InputError(
                f"{spec}: module {module_name!r} has no attribute {attribute!r}"
            ) from None
    return obj



def _import_module(name: str, spec: str) -> types.ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        missing = err.name or ""
        cwd = os.getcwd()
        if (name == missing or name.startswith(missing + ".")) and cwd not in sys.path:
            sys.path.insert(0, cwd)
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError:
                pass
            except Exception as inner:
                raise _import_error(spec, name, inner) from inner
        raise InputError(
            f"{spec}: cannot import module {name!r} ({one_line(err)}); it must be importable "
            "(installed, on PYTHONPATH, or in the current directory) or be a path to a .py file"
        ) from err
    except Exception as err:
        raise _import_error(spec, name, err) from err



def _import_error(spec: str, name: str, err: BaseException) -> InputError:
    return InputError(f"{spec}: importing {name!r} raised {type(err).__name__}: {one_line(err)}")



def _import_file(filename: str, spec: str) -> types.ModuleType:
    file = Path(filename)
    if not file.is_file():
        raise InputError(f"{spec}: Python file not found: {filename}")
    resolved = file.resolve()
    stem = re.sub(r"\W", "_", resolved.stem)
    name = f"basins_user_{stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, resolved)
    if module_spec is None or module_spec.loader is None:
        raise InputError(f"{spec}: cannot import {filename} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise _import_error(spec, filename, err) from err
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(folder)
    return module



def load_loss(spec: str | None) -> str | NamedLoss | None:
    """A loss as the engine takes it: a built-in name as it is, ``module:function`` imported.

    Raises:
        InputError: the spec is neither a built-in name nor an importable callable.
    """
    if spec is None or spec in BUILTIN_LOSSES:
        return spec
    if ":" not in spec:
        raise InputError(f"unknown loss {spec!r}: use one of {', '.join(BUILTIN_LOSSES)} or module:function")
    fn = import_object(spec)
    if not callable(fn):
        raise InputError(f"loss {spec!r} is not callable")
    return NamedLoss(fn, spec)
