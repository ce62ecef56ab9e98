"""The aten operators a training step dispatches: counted against hand-counted computations, and per regime."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from php_runner.engine.bench_regime import BenchRegime
from php_runner.engine.step_dispatch import DispatchCounter, step_dispatches
from php_runner.model.config import PHPConfig


def test_a_hand_counted_computation():
    x = torch.ones(3)
    # _to_copy (the cast), add twice, sum, _local_scalar_dense (.item() of a CPU tensor: no kernel, no device read)
    assert step_dispatches(lambda: (x.to(torch.float16) + 1 + 1).sum().item()) == {
        "aten_ops": 5, "views": 0, "kernels": 4, "copies": 1, "device_reads": 0}


def test_views_are_counted_apart_from_the_kernels():
    x = torch.ones(3)
    # view, t and detach describe the same memory; mul and sum compute
    assert step_dispatches(lambda: (x.view(1, 3).t().detach() * 2).sum()) == {
        "aten_ops": 5, "views": 3, "kernels": 2, "copies": 0, "device_reads": 0}


def test_backward_operators_are_counted_too():
    weight = torch.ones(3, requires_grad=True)
    forward = step_dispatches(lambda: (weight * 2).sum())
    both = step_dispatches(lambda: (weight * 2).sum().backward())
    assert forward["aten_ops"] == 2 and both["aten_ops"] > forward["aten_ops"] and weight.grad is not None


class FakeRead:
    """aten._local_scalar_dense as the dispatcher hands it over, for tensors of any device."""

    overloadpacket = SimpleNamespace(__name__="_local_scalar_dense")
    is_view = False

    def __call__(self, *args, **kwargs):
        return 0.0


def test_only_reads_of_a_tensor_off_the_cpu_are_device_reads():
    counter = DispatchCounter()
    for device in ("cpu", "cuda", "cpu", "cuda"):
        counter.__torch_dispatch__(FakeRead(), (), (SimpleNamespace(device=torch.device(device)),))
    assert counter.device_reads == 2 and counter.host_reads == 2 and counter.operators == {"_local_scalar_dense": 4}


def _dispatches(regime: str, device: str) -> dict[str, int]:
    config = PHPConfig.tiny()
    bench = BenchRegime(config, regime, 4, torch.device(device))
    batch = bench.device_batch(config, 4)
    bench.step(batch)  # the optimiser's state is built on the first step
    return step_dispatches(lambda: bench.step(batch))


def test_the_official_regime_dispatches_more_than_the_fast_one():
    """fp16 weights with fp32 masters (copies each step) and per-tensor groups against fp32 and merged ones."""
    official, fast = _dispatches("official", "cpu"), _dispatches("fast", "cpu")
    assert official["aten_ops"] > 1.5 * fast["aten_ops"] and official["kernels"] > 1.5 * fast["kernels"]
    assert official["copies"] > fast["copies"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_fast_step_on_cuda_reads_nothing_back_from_the_device():
    assert _dispatches("fast", "cuda")["device_reads"] == 0
