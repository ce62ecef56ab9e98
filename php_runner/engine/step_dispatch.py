"""What one training step asks of the host: the aten operators it dispatches, counted on any device.

Every operator costs the host its dispatch; at the paper's batch of 64, where the GPU finishes a kernel
before the host has launched the next, these costs are what a step costs. Views (``view``, ``t``,
``detach``, ...: a new description of the same memory) launch no kernel; every other operator, bar a
read of a CPU scalar, runs one (on CUDA about one launch each, a ``_foreach_`` operator a few): the
``kernels`` count. ``aten._to_copy`` operators are the dtype and device copies (autocast's casts on
CUDA); device reads are ``aten._local_scalar_dense`` (``.item()``) of a tensor off the CPU, each a
synchronisation (reads of CPU tensors, such as the optimisers' step counts, cost no wait and no kernel).
Counted on the device the step runs on: on the CPU, torch's optimisers loop over tensors where CUDA
takes their multi-tensor (``_foreach_``) path, so the optimiser's share there is larger than on CUDA.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchCounter(TorchDispatchMode):
    """Counts the aten operators dispatched under it, by name (forward, backward and optimiser alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.operators: Counter[str] = Counter()
        self.views = 0
        self.device_reads = 0
        self.host_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.operators[name] += 1
        self.views += func.is_view
        if name == "_local_scalar_dense":
            if args[0].device.type == "cpu":
                self.host_reads += 1
            else:
                self.device_reads += 1
        return func(*args, **(kwargs or {}))


def step_dispatches(step: Callable[[], object]) -> dict[str, int]:
    """The aten operators ``step()`` dispatches: all of them, the views and kernels among them, the copies
    among the kernels, and its device reads."""
    counter = DispatchCounter()
    with counter:
        step()
    aten_ops = sum(counter.operators.values())
    return {"aten_ops": aten_ops, "views": counter.views, "kernels": aten_ops - counter.views - counter.host_reads,
            "copies": counter.operators["_to_copy"], "device_reads": counter.device_reads}
