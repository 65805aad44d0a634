"""Inference copies of modules: 4-D weights in channels_last on the CPU.

oneDNN runs a convolution whose weights are channels_last without reordering its activations to
and from its blocked layout on every call; measured on the MNIST networks (2-core AMD EPYC, fp32,
batch 256): the classifier 0.44 → 0.29 ms of CPU per image, the combo-VAE's decoder 0.18 → 0.15
(`benchmarks/serving.py`). Outputs agree with the original module to float rounding (the
summation order differs).

The copy is made once per module and cached; it is rebuilt when any weight of the module changes
(in place or replaced) or a submodule's train/eval mode does, so it never serves stale weights.
On other devices the module itself is returned (not measured there).
"""

from __future__ import annotations

import copy
import logging
import weakref
from itertools import chain
from typing import Any, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)
M = TypeVar("M", bound=nn.Module)
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[Any, ...], nn.Module]] = (
    weakref.WeakKeyDictionary()
)
_UNCOPYABLE: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def _state(module: nn.Module) -> tuple[Any, ...]:
    """What identifies a module's weights and modes: each tensor's storage and version counter
    (bumped by every in-place change), and every submodule's training flag."""
    tensors = chain(module.parameters(), module.buffers())
    # an inference tensor has no version counter (and can change only in inference mode)
    weights = tuple(
        (t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device) for t in tensors
    )
    return weights, tuple(m.training for m in module.modules())


def inference_copy(module: M) -> M:
    """A cached copy of `module` with channels_last weights (CPU), or `module` itself (other
    devices, or a module that cannot be deep-copied, e.g. one holding non-leaf tensors)."""
    if not isinstance(module, nn.Module):  # a duck-typed model: nothing to convert
        return module
    first = next(chain(module.parameters(), module.buffers()), None)
    if first is None or first.device.type != "cpu" or module in _UNCOPYABLE:
        return module
    state = _state(module)
    hit = _CACHE.get(module)
    if hit is not None and hit[0] == state:
        return hit[1]  # type: ignore[return-value]
    try:
        twin = copy.deepcopy(module).requires_grad_(False)
        twin.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    except (TypeError, RuntimeError) as exc:
        log.info("no channels_last copy of %s (%s): using it as it is", type(module).__name__, exc)
        _UNCOPYABLE.add(module)
        return module
    _CACHE[module] = (state, twin)
    return twin
