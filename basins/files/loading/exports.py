"""The loader of ``.pt2`` archives, a file or a bundle's: :mod:`.export_reader` for every archive,
``torch.export.load`` only with ``trust_pickle``.

:func:`build` is the entry point :mod:`.models` calls for the tags ``export`` and ``bundle``. Exported programs are turned into inference mode (batch-norm running statistics, dropout off)
and their static batch size is detected. Without ``trust_pickle`` nothing of torch's export
loader runs: the reader validates the archive and refuses what it does not read.
"""

from __future__ import annotations

import contextlib
import io
import logging
import types
from collections.abc import Iterator
from typing import Any

import torch

from basins.errors import InputError

from .checks import Checked
from .describe import EXPORT_HINT, one_line
from .export_reader import read_export_archive
from .sniff import Sniffed

__all__ = ["build"]


def build(sniffed: Sniffed, checked: Checked, *, arch: str | None, trust_pickle: bool
          ) -> tuple[torch.nn.Module, int | None, str | None]:
    """The module of a ``.pt2`` file (tag ``export``) or of the ``.pt2`` in a bundle (``bundle``), in
    inference mode; its static batch size (None for a dynamic batch); no attention path. ``arch``
    is not used (the archive holds the architecture)."""
    path = sniffed.path
    if checked.archive is not None:
        module, fixed = _exported_module(
            checked.archive, f"{path} (the bundle's model)", trust_pickle,
            f"{path}: the model inside the bundle could not be loaded by torch.export.load",
            "rewrite the bundle with this torch version", name=path,
        )
    else:
        module, fixed = _exported_module(
            path, path, trust_pickle, f"{path} looks like a torch.export archive (.pt2) but torch.export.load failed",
            f"re-export it with this torch version ({torch.__version__})",
        )
    return module, fixed, None


def _exported_module(
    archive: str | bytes, source: str, trust_pickle: bool, failed: str, fix: str, *, name: str | None = None
) -> tuple[torch.nn.Module, int | None]:
    """The module of a ``.pt2`` (path or bytes) in inference mode, and its static batch size.

    Untrusted (the default): read by :func:`~.export_reader.read_export_archive`, which refuses
    anything outside what it reads. ``trust_pickle``: ``torch.export.load``, which runs code from
    the file. ``name`` is the source used in messages about the program (default ``source``).
    """
    if trust_pickle:
        return _prepare_exported(_load_export(archive, failed, fix), name or source)
    read = read_export_archive(archive, source)
    _to_inference_mode(read.module, name or source)
    return read.module, read.input_shape[0]


#: operators with effects outside the graph (files, stdout): a crafted .pt2 could read this
#: machine's files into its outputs. Any operator with a ``filename``/``path``/``file`` argument too.
_FILE_OPS = frozenset({"aten::from_file", "aten::save", "aten::_print"})

_TRAINING_FLAG_ARG = {  # op -> (position, name) of its "training" flag
    "aten::batch_norm": (5, "training"),
    "aten::dropout": (2, "train"),
    "aten::feature_dropout": (2, "train"),
    "aten::alpha_dropout": (2, "train"),
    "aten::feature_alpha_dropout": (2, "train"),
}



def _prepare_exported(
    program: torch.export.ExportedProgram, source: str
) -> tuple[torch.nn.Module, int | None]:
    """``program.module()`` in inference mode, and its static batch size (or None)."""
    from torch.export.graph_signature import InputKind, TensorArgument

    user_inputs = [
        spec for spec in program.graph_signature.input_specs if spec.kind == InputKind.USER_INPUT
    ]
    tensors = [spec for spec in user_inputs if isinstance(spec.arg, TensorArgument)]
    if len(user_inputs) != 1 or len(tensors) != 1:
        names = ", ".join(getattr(spec.arg, "name", "?") for spec in user_inputs) or "none"
        raise InputError(
            f"{source}: the exported model takes {len(user_inputs)} inputs ({names}); basins "
            "calls model(x) with one batch tensor x: export a wrapper whose forward takes one "
            "tensor"
        )
    name = tensors[0].arg.name
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    value = node.meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) == 0:
        raise InputError(
            f"{source}: the exported model's input is a scalar, it has no batch dimension: "
            f"export it with a batch of examples: {EXPORT_HINT}"
        )
    first = shape[0]
    fixed = int(first) if isinstance(first, int) else None
    module = program.module()
    _to_inference_mode(module, source)
    return module, fixed



def _to_inference_mode(module: torch.fx.GraphModule, source: str) -> None:
    """Rewrite training-mode ops of an unlifted exported graph to eval behaviour, in place.

    ``torch.export`` bakes train/eval into the graph, and the module it returns refuses
    ``eval()``. Batch norm and dropout carry a ``training`` flag that is set to ``False``, and
    the ``num_batches_tracked += 1`` of batch norm is dropped. Any other op that mutates state
    means the model is not a function of its parameters: refused.
    """
    graph = module.graph
    changed = False
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if schema.name in _FILE_OPS or any(a.name in ("filename", "path", "file") for a in schema.arguments):
            raise InputError(
                f"{source}: the exported model calls {schema.name}, which reads, writes or prints outside "
                "the model; basins does not run such a graph: export the model's computation alone"
            )
        flag = _TRAINING_FLAG_ARG.get(schema.name)
        if flag is not None:
            position, keyword = flag
            if len(node.args) > position and node.args[position] is True:
                args = list(node.args)
                args[position] = False
                node.args = tuple(args)
                changed = True
            elif node.kwargs.get(keyword) is True:
                node.kwargs = {**node.kwargs, keyword: False}
                changed = True
            continue
        if schema.is_mutable:
            target = node.args[0] if node.args else None
            if (
                isinstance(target, torch.fx.Node)
                and target.op == "get_attr"
                and str(target.target).endswith("num_batches_tracked")
                and not node.users
            ):
                graph.erase_node(node)
                changed = True
                continue
            raise InputError(
                f"{source}: the exported model updates its own state when called "
                f"({schema.name}); export it in eval mode, after model.eval(): {EXPORT_HINT}"
            )
    if changed:  # (no dead-code elimination: it could drop the input-guard call)
        module.recompile()
    for submodule in module.modules():
        submodule.training = False

    def _eval(self: torch.nn.Module) -> torch.nn.Module:
        return self

    def _train(self: torch.nn.Module, mode: bool = True) -> torch.nn.Module:
        if mode:
            raise NotImplementedError(
                "basins loaded this exported program in inference mode; it cannot be trained"
            )
        return self

    module.eval = types.MethodType(_eval, module)  # type: ignore[method-assign]
    module.train = types.MethodType(_train, module)  # type: ignore[method-assign]



def _load_export(archive: str | bytes, failed: str, fix: str) -> Any:
    """``torch.export.load`` of a path or of archive bytes (``trust_pickle`` only: it runs code from
    the file); a failure is an :class:`InputError` ``"{failed} (why); {fix}"``. torch's own logged
    tracebacks are kept off the terminal (the error says what failed)."""
    try:
        with _quiet_torch_logs():
            return torch.export.load(io.BytesIO(archive) if isinstance(archive, bytes) else archive)
    except Exception as err:
        raise InputError(f"{failed} ({one_line(err)}); {fix}") from err


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """Capture what torch logs (it logs a deserialisation failure with its traceback, then raises)."""
    logger = logging.getLogger("torch")
    handler = logging.NullHandler()
    saved = logger.propagate, logger.handlers[:]
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        logger.propagate, logger.handlers = saved[0], saved[1]


