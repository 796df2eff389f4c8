"""Host syncs of a training step: each operator that makes the CPU wait for the GPU, counted and attributed.

    with syncs.SyncCounter(model) as counter:
        trainable.train_step(...)
    counter.summary()        # by owner (ours / the package's), by operator, per decoder layer

A host sync is an operator whose result the host needs before it can go on
queueing kernels: a tensor read as a Python number (`.item()`, `int()`,
`bool()`, `torch.equal`), an output whose size depends on the data
(`nonzero`, indexing with a boolean mask, `masked_select`), and copies
between the host and the device that wait (device to host; host to device
from pageable memory, or without `non_blocking`). `SyncCounter` is a
`TorchDispatchMode` that sees every operator the step runs. On the CPU the
data-dependent operators are the same as on CUDA (they decide shapes and
branches, whatever the device), so the count taken here is the count a GPU
step makes; copies between devices exist only where there is a device.

Each sync is attributed to an owner by the Python frames that ran it: the
innermost frame outside torch is ours (a module of this repository) or the
package's (`boson-multimodal`, with the transformers and peft code it
calls). In backward the engine runs the operator, so the frames of the
forward call that created its autograd node are used instead (recorded by
anomaly mode, which is on while counting). Each sync is also placed in the
decoder layer it ran in (forward: the layer whose `forward` is on the
stack; backward: the layer whose output gradient came last), or outside
the layers.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import model_utils

THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parent
# Resolved, as every frame's file name is before it is compared: a virtual environment reached through a symbolic
# link runs torch by the link's path.
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
aten = torch.ops.aten

# Operators whose result the host reads, or whose output size depends on the data.
DATA_DEPENDENT = {
    aten._local_scalar_dense.default: "item",
    aten.is_nonzero.default: "is_nonzero",
    aten.equal.default: "equal",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.unique_consecutive.default: "unique",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
}
BOOLEAN_INDEXED = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
COPIES = {aten._to_copy.default, aten.copy_.default}
OURS, PACKAGE = "ours", "package"


@dataclass(frozen=True)
class Sync:
    """One host sync: what waited, whose code asked for it, and where."""

    operator: str
    owner: str  # OURS or PACKAGE
    where: str  # file:line function of the frame that decided the owner
    layer: int | None  # decoder layer it ran in; None outside the layers
    phase: str  # forward, backward (run by the autograd engine) or recompute (checkpointed forward in backward)


class SyncCounter(TorchDispatchMode):
    """Counts the host syncs of what runs inside it; `model` (a `HiggsAudioModel`, or a wrapper of one)
    names the decoder layers so that each sync is placed in one.

    `device` is where the step runs. On a GPU an operator on host tensors
    alone waits for nothing (torch's AdamW keeps its step counts on the host,
    torchao its learning rate) and is not counted; on the CPU every
    data-dependent operator is, as the GPU step would sync on it.
    """

    def __init__(self, model: torch.nn.Module | None = None, device: str = "cpu"):
        super().__init__()
        self.on_host = torch.device(device).type == "cpu"
        self.syncs: list[Sync] = []
        self.modules = list(model_utils.decoder_layers(model)) if model is not None else []
        self.layers = {id(layer): index for index, layer in enumerate(self.modules)}
        self.backward_layer: int | None = None
        self.handles: list = []
        self.anomaly = None

    def __enter__(self):
        for index, layer in enumerate(self.modules):
            self.handles.append(layer.register_forward_hook(self._mark_backward_entry(index)))
        if self.modules:
            self.handles.append(self.modules[0].register_forward_pre_hook(self._mark_backward_exit))
        self.anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)
        self.anomaly.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        result = super().__exit__(*exc)
        self.anomaly.__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        return result

    def _mark_backward_entry(self, index: int):
        """A hook on the layer's output: its gradient arriving means backward has entered the layer."""

        def hook(_module, _args, outputs):
            hidden = outputs[0] if isinstance(outputs, tuple) else outputs
            if hidden.requires_grad:
                hidden.register_hook(lambda grad: self._enter_layer(index))

        return hook

    def _mark_backward_exit(self, _module, args):
        """A hook on the first layer's input: its gradient arriving means backward has left the layers."""
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
            args[0].register_hook(lambda grad: self._enter_layer(None))

    def _enter_layer(self, index: int | None) -> None:
        self.backward_layer = index

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        operator = _sync_operator(func, args, kwargs)
        if operator and (self.on_host or operator.endswith("copy") or _on_device(args, kwargs)):
            self.syncs.append(self._attribute(operator))
        return func(*args, **kwargs)

    def _attribute(self, operator: str) -> Sync:
        frames = traceback.extract_stack()
        if torch._C._current_autograd_node() is None:
            owner, where = _owner(frames)
            return Sync(operator, owner, where, self._forward_layer(), "forward")
        inside = _python_inside_engine(frames)
        if inside:  # a checkpointed layer's forward, run again by the engine
            owner, where = _owner(inside)
            return Sync(operator, owner, where, self._forward_layer(), "recompute")
        node = torch._C._current_autograd_node()
        owner, where = _owner(_parse_frames(node.metadata.get("traceback_", [])))
        return Sync(operator, owner, where, self.backward_layer, "backward")

    def _forward_layer(self) -> int | None:
        """The decoder layer whose `forward` is on this thread's stack, if any."""
        frame = sys._getframe()
        while frame is not None:
            owner = frame.f_locals.get("self")
            if owner is not None and id(owner) in self.layers:
                return self.layers[id(owner)]
            frame = frame.f_back
        return None

    def summary(self) -> dict:
        """Counts by owner, by (owner, operator, where), and per layer by owner."""
        by_layer: dict = {}
        for sync in self.syncs:
            key = "outside layers" if sync.layer is None else f"layer {sync.layer}"
            by_layer.setdefault(key, Counter())[sync.owner] += 1
        return {
            "total": len(self.syncs),
            OURS: sum(sync.owner == OURS for sync in self.syncs),
            PACKAGE: sum(sync.owner == PACKAGE for sync in self.syncs),
            "by_phase": dict(Counter(f"{sync.owner} {sync.phase}" for sync in self.syncs)),
            "by_site": dict(Counter(f"{sync.owner}: {sync.operator} at {sync.where}" for sync in self.syncs).most_common()),
            "by_layer": {key: dict(counts) for key, counts in by_layer.items()},
        }

    def ours(self) -> list[Sync]:
        return [sync for sync in self.syncs if sync.owner == OURS]


def _sync_operator(func, args, kwargs) -> str | None:
    """The kind of host sync `func` on these arguments is, or None."""
    if func in DATA_DEPENDENT:
        return DATA_DEPENDENT[func]
    if func in BOOLEAN_INDEXED:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices):
            return f"{func.__name__.split('.')[0]} with a boolean mask"
    if func in COPIES:
        return _waiting_copy(func, args, kwargs)
    return None


def _on_device(args, kwargs) -> bool:
    return any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in pytree.tree_leaves((args, kwargs)))


def _waiting_copy(func, args, kwargs) -> str | None:
    """A copy between host and device that makes the host wait: device to host, or host to device from
    pageable memory or without `non_blocking` (pinned memory with `non_blocking` does not wait)."""
    if func is aten.copy_.default:
        destination, source = args[0].device, args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        source = args[0]
        destination = kwargs.get("device") or source.device
        non_blocking = kwargs.get("non_blocking", False)
    if source.device.type == destination.type or "meta" in (source.device.type, destination.type):
        return None
    if destination.type == "cpu":
        return "device-to-host copy"
    if source.device.type == "cpu" and not (non_blocking and source.is_pinned()):
        return "waiting host-to-device copy"
    return None


def _python_inside_engine(frames: traceback.StackSummary) -> list[traceback.FrameSummary]:
    """The frames outside torch that run inside the autograd engine: those after the call that entered it
    (`.backward()`), or, on the engine's own thread (CUDA backward), all of them."""
    entry = max((index for index, frame in enumerate(frames)
                 if frame.name == "_engine_run_backward" and _resolved(frame.filename).startswith(TORCH_DIR)), default=-1)
    inside = list(frames)[entry + 1:]
    return inside if any(not _in_torch(frame) for frame in inside) else []


def _owner(frames) -> tuple[str, str]:
    """OURS or PACKAGE, and where, from the innermost frame outside torch: ours if it is in this repository,
    or if it is package code that our code called directly (not through torch's module call), such as a
    package function we run ourselves; else the package's."""
    outside = [(index, _source(frame)) for index, frame in enumerate(frames) if not _in_torch(frame)]
    if not outside:
        return PACKAGE, "torch"
    index, source = outside[-1]
    where = f"{Path(frames[index].filename).name}:{frames[index].lineno} {frames[index].name}"
    if source == OURS:
        return OURS, where
    while index > 0 and not _in_torch(frames[index - 1]) and _source(frames[index - 1]) == PACKAGE:
        index -= 1
    caller = frames[index - 1] if index > 0 else None
    return (OURS if caller is not None and not _in_torch(caller) and _source(caller) == OURS else PACKAGE), where


def _in_torch(frame: traceback.FrameSummary) -> bool:
    """Torch's own code, code with no file, or this counter."""
    if frame.filename.startswith("<"):
        return True
    resolved = _resolved(frame.filename)
    return resolved.startswith(TORCH_DIR) or resolved == str(THIS_FILE)


def _source(frame: traceback.FrameSummary) -> str:
    """OURS for a file of this repository (its tests included; not a virtual environment inside it)."""
    path = Path(_resolved(frame.filename))
    return OURS if ROOT in path.parents and "site-packages" not in path.parts else PACKAGE


@functools.lru_cache(maxsize=None)
def _resolved(filename: str) -> str:
    """The file's path with symbolic links resolved, once per file: a step looks at thousands of frames."""
    return str(Path(filename).resolve())


def _parse_frames(formatted: list[str]) -> list[traceback.FrameSummary]:
    """Frames back from `traceback.format_stack` lines (anomaly mode's record of a forward call)."""
    frames = []
    for entry in formatted:
        head = entry.strip().splitlines()[0]
        if head.startswith('File "'):
            filename, _, rest = head[len('File "'):].partition('", line ')
            line, _, name = rest.partition(", in ")
            frames.append(traceback.FrameSummary(filename, int(line), name.strip(), lookup_line=False))
    return frames
