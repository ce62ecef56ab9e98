"""Precision regimes: ``official`` (the mixed fp16/fp32 weight layout of spec 2.2, forward in fp16) and
``amp`` (fp32 master weights, bf16 autocast on CUDA, plain fp32 on CPU).

Under ``official`` the compute dtype follows the weights, exactly as in the official code: CLIP casts its
input to ``conv1``'s fp16, CLIP's LayerNorm subclass normalises in fp32 and casts back, the gate softmaxes
upcast to fp32, and final features are ``.float()``. Every op involved has an fp16 CPU kernel in the torch
versions this project supports, so the same regime runs on CPU (slowly) and on CUDA.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from php_runner.model.clip import CLIP, LayerNorm, SelfAttention, VisionTransformer
from php_runner.model.php import CRFM

PRECISIONS = ("official", "amp")
# The precisions whose training step may run as CUDA graphs (``runtime.cuda_graphs``): the fast regime only.
# ``official`` reproduces the official code's fp16 numerics op by op; a compiled region fuses and reorders them.
GRAPHABLE_PRECISIONS = ("amp",)


def _to_half(parameter: nn.Parameter | None) -> None:
    if parameter is not None:
        parameter.data = parameter.data.to(torch.float16)
        if parameter.grad is not None:
            parameter.grad = parameter.grad.to(torch.float16)


def _official_half_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that are fp16 in the official model; everything else stays fp32."""
    half: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            half += [module.weight, module.bias]  # covers attention out_proj, gates, experts, classifier
        elif isinstance(module, SelfAttention):
            half += [module.in_proj_weight, module.in_proj_bias]
        elif isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm):
            # Plain LayerNorms (CRFM feed.0, adapter norms) are created in fp16 officially; CLIP's subclass is not.
            half += [module.weight, module.bias]
        if isinstance(module, CLIP):
            half.append(module.text_projection)
        elif isinstance(module, VisionTransformer):
            half.append(module.proj)
        elif isinstance(module, CRFM):
            half.append(module.part_tokens)  # created in fp16 officially
    return [p for p in half if p is not None]


def apply_precision(model: nn.Module, precision: str) -> nn.Module:
    """Set the weight dtypes of ``precision`` in place (parameter objects are kept) and return the model."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    for parameter in model.parameters():
        if parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            if parameter.grad is not None:
                parameter.grad = parameter.grad.float()
    if precision == "official":
        for parameter in _official_half_parameters(model):
            _to_half(parameter)
    return model


@contextlib.contextmanager
def float32_matmul_scope(allow_tf32: bool):
    """fp32 matmuls in TF32 (``allow_tf32``) or in full fp32 for the block only; the process settings come back.

    Restored on exit: ``torch.get_float32_matmul_precision()`` (which also decides
    ``torch.backends.cuda.matmul.allow_tf32``) and ``torch.backends.cudnn.allow_tf32``, so a training regime's
    TF32 never reaches a later evaluation or another run in the same process.
    """
    previous_precision, previous_cudnn = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous_precision)
        torch.backends.cudnn.allow_tf32 = previous_cudnn


def training_matmul_scope(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The fp32 matmul precision of a training step: TF32 for ``amp`` on CUDA (its bf16 autocast already
    rounds harder), full fp32 otherwise, so the ``official`` regime keeps its numerics in any process."""
    return float32_matmul_scope(precision == "amp" and torch.device(device).type == "cuda")


def inference_weight_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The dtype evaluation casts the weights to: bf16 for ``amp`` on CUDA (faster than autocast over fp32
    weights: no per-op casts), None (the training layout as it is) otherwise."""
    return torch.bfloat16 if precision == "amp" and torch.device(device).type == "cuda" else None


@contextlib.contextmanager
def weights_as(model: nn.Module, dtype: torch.dtype | None):
    """``model``'s floating parameters and buffers in ``dtype`` for the duration (``None``: unchanged); the
    original tensors (fp32 masters, fp16 layout) are put back after, keeping the parameter objects."""
    tensors = [] if dtype is None else [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    originals = [tensor.data for tensor in tensors]
    try:
        for tensor, original in zip(tensors, originals):
            tensor.data = original.to(dtype)
        yield model
    finally:
        for tensor, original in zip(tensors, originals):
            tensor.data = original


def autocast_context(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for ``amp`` on CUDA; a null context otherwise (``official`` runs in the weights' dtypes)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "amp" and torch.device(device).type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
