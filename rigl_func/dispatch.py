"""Count what a piece of code dispatches: kernel-launching ATen ops, host syncs and
host-to-device copies. Deterministic, runs on the CPU, so tests can hold the numbers.

On a GPU every ATen op that computes something is a kernel launch (5-20 us of CPU
time), ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``, ``int(t)``) is a
host-device sync, and a copy from a CPU tensor to a device tensor blocks the host
(pageable memory) and cannot be captured in a CUDA graph. A
:class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen call below
autograd, so counting them on the CPU gives the launch count the same code has on a
GPU (views and metadata ops launch nothing and are not counted).

Example:
    >>> import torch
    >>> with count_ops() as ops:
    ...     y = torch.ones(3).abs().view(3, 1)
    >>> ops.launches, ops.syncs
    (2, 0)
"""

from __future__ import annotations

from collections import Counter
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounts", "count_ops", "NON_LAUNCHING"]

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
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.launches = 0
        self.syncs = 0
        self.host_reads = 0
        self.host_to_device = 0
        self.launch_ops: Counter = Counter()

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
