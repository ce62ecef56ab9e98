"""What one training step asks of the host: the aten operators it dispatches, counted on any device.

Run eagerly on CUDA, each operator is about one kernel launch (a ``_foreach_`` operator a few), so at
the paper's batch of 64, where the GPU finishes a kernel before the host has launched the next, this
count is what a step costs. ``aten._to_copy`` operators are the dtype and device copies (autocast's
casts on CUDA); device reads are ``aten._local_scalar_dense`` (``.item()``) of a tensor off the CPU, each
a synchronisation (reads of CPU tensors, such as the optimisers' step counts, cost no wait).
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
        self.device_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.operators[name] += 1
        if name == "_local_scalar_dense" and args[0].device.type != "cpu":
            self.device_reads += 1
        return func(*args, **(kwargs or {}))


def step_dispatches(step: Callable[[], object]) -> dict[str, int]:
    """The aten operators ``step()`` dispatches: all of them, the copies among them, and its device reads."""
    counter = DispatchCounter()
    with counter:
        step()
    return {"aten_ops": sum(counter.operators.values()), "copies": counter.operators["_to_copy"],
            "device_reads": counter.device_reads}
