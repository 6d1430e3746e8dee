"""Count what a piece of code dispatches: kernel-launching ATen ops, host syncs,
host-to-device copies and the bytes those ops read and write. Deterministic, runs on
the CPU (or ``meta``), so tests can hold the numbers.

On a GPU every ATen op that computes something is a kernel launch (5-20 us of CPU
time), ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``) is a
host-device sync, and a copy from a CPU tensor to a device tensor blocks the host
(pageable memory) and cannot be captured in a CUDA graph. A
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen call below
autograd, so counting them on the CPU gives the launch count the same code has on a
GPU (views and metadata ops launch nothing and are not counted).

Bytes: every kernel-launching op is charged the bytes of its tensor inputs (read)
and outputs (written), each tensor counted by the distinct elements it addresses (a
stride-0 ``expand`` of a scalar costs one element). That is the traffic of one pass
per op, the quantity that bounds an elementwise kernel on a GPU (bytes / bandwidth);
ops that make several passes internally (``topk``, ``sort``) are charged one, so
the figure is a floor for them. On ``meta`` tensors nothing is computed, so any model
size can be measured.

Example:
    >>> import torch
    >>> with count_ops() as ops:
    ...     y = torch.ones(3).abs().view(3, 1)
    >>> ops.launches, ops.syncs, ops.bytes_read, ops.bytes_written
    (2, 0, 12, 24)
"""

from __future__ import annotations

import weakref
from collections import Counter
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounts", "count_ops", "NON_LAUNCHING", "tensor_bytes", "MemoryTracker", "track_memory"]

#: Ops that only create views or read metadata: no kernel runs.
NON_LAUNCHING = frozenset({
    "view", "_unsafe_view", "reshape", "as_strided", "expand", "permute", "transpose", "t", "squeeze",
    "unsqueeze", "select", "slice", "split", "split_with_sizes", "unbind", "narrow", "alias", "detach",
    "view_as", "flatten", "unflatten", "chunk", "diagonal", "_reshape_alias", "lift_fresh", "empty",
    "empty_like", "empty_strided", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "is_same_size",
    "_to_copy_noop", "set_", "resize_", "view_as_real", "view_as_complex", "real", "_neg_view", "_conj",
    "expand_as", "movedim", "numpy_T", "dim", "size", "stride", "numel", "is_nonzero_meta",
})


_FACTORIES = ("tensor", "as_tensor", "asarray")


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses (a broadcast view counts its
    storage span, not its numel).

    Example:
        >>> tensor_bytes(torch.zeros(4)), tensor_bytes(torch.zeros(()).expand(1000))
        (16, 4)
    """
    n = t.numel()
    if n == 0:
        return 0
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return min(n, span) * t.element_size()


def _tensors(tree) -> list:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


class OpCounts(TorchDispatchMode):
    """A dispatch mode that records every ATen op; see :func:`count_ops`.

    Attributes:
        ops: ``Counter`` of op overload packet names (``"add"``, ``"topk"``, ...),
            all ops including views.
        launches: number of ops that launch a kernel (not in :data:`NON_LAUNCHING`).
        syncs: number of ``aten._local_scalar_dense`` calls (``.item()``, ``bool(t)``,
            ``int(t)``) on non-CPU tensors: host-device syncs.
        host_reads: the same calls on CPU tensors (free: no device to wait for).
        host_to_device: copies from the host to another device: ``aten._to_copy`` /
            ``aten.copy_`` with a CPU source and a non-CPU result, and
            ``torch.tensor`` / ``torch.as_tensor`` / ``torch.asarray`` called with
            Python data (or a CPU tensor) and a non-CPU ``device`` (these copy below
            the dispatcher, so the mode patches the three functions while active).
        bytes_read, bytes_written: bytes of the tensor inputs / outputs of the
            launching ops (:func:`tensor_bytes`; an ``out=`` tensor is written, not read).
        bytes_by_op: ``Counter`` of read + written bytes per op name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.launches = 0
        self.syncs = 0
        self.host_reads = 0
        self.host_to_device = 0
        self.launch_ops: Counter = Counter()
        self.bytes_read = 0
        self.bytes_written = 0
        self.bytes_by_op: Counter = Counter()

    @property
    def bytes_moved(self) -> int:
        """``bytes_read + bytes_written``."""
        return self.bytes_read + self.bytes_written

    def __enter__(self):
        self._saved = {n: getattr(torch, n) for n in _FACTORIES}
        for n, fn in self._saved.items():
            setattr(torch, n, self._watch(fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for n, fn in self._saved.items():
            setattr(torch, n, fn)
        return super().__exit__(*exc)

    def _watch(self, fn):
        def wrapper(data, *args, **kwargs):
            device = kwargs.get("device")
            if device is not None and torch.device(device).type != "cpu":
                on_host = not isinstance(data, torch.Tensor) or data.device.type == "cpu"
                self.host_to_device += int(on_host)
            return fn(data, *args, **kwargs)
        return wrapper

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name == "_local_scalar_dense":
            on_cpu = isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"
            self.host_reads += int(on_cpu)
            self.syncs += int(not on_cpu)
        if name not in NON_LAUNCHING:
            self.launches += 1
            self.launch_ops[name] += 1
        out = func(*args, **kwargs)
        if name not in NON_LAUNCHING:
            read = sum(tensor_bytes(t) for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "out"})))
            written = sum(tensor_bytes(t) for t in _tensors(out))
            self.bytes_read += read
            self.bytes_written += written
            self.bytes_by_op[name] += read + written
        if name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst = args[0] if name == "copy_" else out
            if (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
                    and src.device.type == "cpu" and dst.device.type != "cpu"):
                self.host_to_device += 1
        return out


def count_ops() -> OpCounts:
    """Context manager counting ATen ops, launches, syncs and host-to-device copies.

    Returns:
        An :class:`OpCounts` mode; read its attributes after the ``with`` block.
    """
    return OpCounts()


class MemoryTracker(TorchDispatchMode):
    """A dispatch mode that follows the storages the ops under it allocate; see
    :func:`track_memory`.

    Attributes:
        peak_bytes: the largest total of live storages allocated inside the block
            (inputs made before the block are not counted; outputs still referenced
            at the peak are).
        live_bytes: the total still alive when last updated (at exit: what the block
            returned or kept).
    """

    def __init__(self) -> None:
        super().__init__()
        self.peak_bytes = 0
        self.live_bytes = 0
        self._owners: dict[int, list] = {}  # storage id -> [nbytes, live tensor objects]
        self._known: set = set()

    def _release(self, key: int) -> None:
        entry = self._owners.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self._owners[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._owners:
                self._owners[key][1] += 1
            elif key in self._known:  # an input's storage (or a view of one): not ours
                continue
            else:
                if any(isinstance(a, torch.Tensor) and a.untyped_storage()._cdata == key for a in _tensors((args, kwargs))):
                    self._known.add(key)  # in place / out= on an input's storage
                    continue
                self._owners[key] = [storage.nbytes(), 1]
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(t, self._release, key)
        return out


def track_memory() -> MemoryTracker:
    """Context manager measuring the peak memory that the ops in its block allocate.

    Deterministic and device-independent: it runs on ``meta`` tensors (no memory is
    touched), so the peak of an update of a billion-weight model can be measured on a
    CPU.

    Example:
        >>> with track_memory() as mem:
        ...     a = torch.ones(1000)
        ...     b = (a + 1).sum()
        >>> mem.peak_bytes >= 8000, mem.live_bytes
        (True, 4004)
    """
    return MemoryTracker()
