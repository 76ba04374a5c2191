"""Projections that read one input, merged so that fused decode graphs run each group as one GEMM (fusion.py): an
attention's q/k/v projections, a SwiGLU MLP's gate and up.

``merge`` moves a group's weights into one contiguous ``[N1 + N2 + ..., K]`` tensor (and its biases into one) and
points each ``nn.Linear``'s parameter at its row block: the same Parameter objects (names, ``requires_grad``), the
same values, contiguous and as aligned as the allocator made them, so every eager call computes what it did; the
originals are freed, so no memory is added. ``unmerge`` gives each tensor storage of its own again (unwrap_model).
``save_pretrained`` writes the same files either way: before writing, transformers clones tensors that share a
storage in disjoint areas (``remove_tied_weights_from_state_dict``, the same code in 5.17 to 5.25).

Inside a capture run a merged MLP calls ``MergedWeights.linear`` itself; attention code calls its projections one by
one, so ``SharedInputGEMM`` runs the group's GEMM on the first call and hands the others their columns of it.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.nn import functional

# cuBLAS picks GEMM kernels by their operands' alignment, up to 256 bytes (torch hands it to cuBLASLt): a block that
# starts a multiple of 256 bytes into the merged tensor is as aligned as the allocator's own tensors, so eager's GEMMs
# on it pick what they picked before.
_ALIGNMENT = 256


def storage_users(model: nn.Module) -> Counter[int]:
    """How many parameter and buffer registrations of ``model`` use each storage (a tied weight counts twice); tensor
    subclasses (quantized, distributed), whose storage may not be readable, are not counted and never merged."""
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    return Counter(tensor.untyped_storage().data_ptr() for _, tensor in named if _plain_tensor(tensor))


def _plain_tensor(tensor: torch.Tensor) -> bool:
    return type(tensor) in (torch.Tensor, nn.Parameter)


def is_plain_linear(module: nn.Module | None) -> bool:
    """An ``nn.Linear`` itself (not a quantized or adapter subclass) running its class forward without hooks: calling
    it is ``F.linear(x, weight, bias)`` and nothing else."""
    return (type(module) is nn.Linear and "forward" not in module.__dict__ and not module._forward_hooks
            and not module._forward_pre_hooks and not hasattr(module, "_hf_hook"))


@dataclass(frozen=True)
class MergedWeights:
    """A merged group's weight and bias as one tensor each, and each projection's output width, in order."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    widths: tuple[int, ...]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """Every projection of the group on ``x`` in one GEMM: their outputs side by side along the last dim."""
        return functional.linear(x, self.weight, self.bias)

    def split(self, output: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each projection's columns of ``linear``'s output (views)."""
        return output.split(self.widths, dim=-1)


@dataclass(frozen=True)
class ProjectionGroup:
    """Linears that read one input, whose weights (and biases) ``merge`` made row blocks of one tensor."""

    linears: tuple[nn.Linear, ...]

    def weights(self) -> MergedWeights | None:
        """The group's merged weight and bias while each linear is still plain and its tensors still its row blocks;
        None once a cast, ``to()`` or an assignment gave them storage of their own (the linears then run as they
        are)."""
        if not all(is_plain_linear(linear) for linear in self.linears):
            return None
        weight = _joined([linear.weight for linear in self.linears])
        biases = [linear.bias for linear in self.linears]
        bias = None if all(b is None for b in biases) else _joined(biases)
        if weight is None or (bias is None and any(b is not None for b in biases)):
            return None
        return MergedWeights(weight, bias, tuple(linear.out_features for linear in self.linears))

    def unmerge(self) -> None:
        """Each weight and bias that is a block of a larger storage (the merged tensor) cloned into storage of its own;
        the merged tensor is freed with its last block."""
        with _outside_inference_mode():
            for linear in self.linears:
                for tensor in (linear.weight, linear.bias):
                    if (tensor is not None and _plain_tensor(tensor)
                            and tensor.untyped_storage().nbytes() > tensor.nbytes):
                        tensor.data = tensor.detach().clone()


def merge(linears: Sequence[nn.Module | None], users: Counter[int]) -> ProjectionGroup | None:
    """``linears``' weights moved into one tensor, their biases into another, each parameter pointed at its block; None,
    and nothing changed, unless ``_mergeable``."""
    if not _mergeable(linears, users):
        return None
    with _outside_inference_mode():
        for name in ("weight", "bias"):
            parameters = [getattr(linear, name) for linear in linears]
            if parameters[0] is None:
                continue
            merged = torch.cat([parameter.detach() for parameter in parameters])
            start = 0
            for parameter in parameters:  # each original is freed as its parameter moves to its block
                parameter.data = merged[start:start + parameter.shape[0]]
                start += parameter.shape[0]
    return ProjectionGroup(tuple(linears))


def release_freed_weights(merged: list[ProjectionGroup]) -> None:
    """Give the device back the memory the merged weights' originals held. A large weight has a segment of its own in
    torch's caching allocator, and a group's merged tensor (allocated before its parts are freed) cannot reuse its
    parts' segments: without this, the allocator would keep every original's segment reserved, as large as the merged
    weights together (GBs at 8B), until an allocation ran short."""
    devices = {linear.weight.device for group in merged for linear in group.linears}
    if any(device.type == "cuda" for device in devices):
        torch.cuda.empty_cache()


def _mergeable(linears: Sequence[nn.Module | None], users: Counter[int]) -> bool:
    """Plain ``nn.Linear``s holding torch's own tensors (no quantized or distributed subclass) of one input width,
    dtype and device, all biased or none, whose tensors each own their whole storage and share it with no other
    parameter or buffer (neither tied nor a view: merging them would untie them or free nothing), and whose blocks
    would start ``_ALIGNMENT``-aligned."""
    if len(linears) < 2 or not all(is_plain_linear(linear) for linear in linears):
        return False
    first = linears[0].weight
    weights = [linear.weight for linear in linears]
    biases = [linear.bias for linear in linears]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        return False
    tensors = weights + [b for b in biases if b is not None]
    return (
        all(_plain_tensor(t) for t in tensors) and first.device.type != "meta"
        and all(w.shape[1] == first.shape[1] for w in weights)
        and all(t.dtype == first.dtype and t.device == first.device for t in tensors)
        and all(_sole_user(t, users) for t in tensors)
        and _aligned(weights) and (biases[0] is None or _aligned(biases))
    )


def _sole_user(tensor: torch.Tensor, users: Counter[int]) -> bool:
    storage = tensor.untyped_storage()
    return (tensor.is_contiguous() and tensor.storage_offset() == 0 and storage.nbytes() == tensor.nbytes
            and users[storage.data_ptr()] == 1)


def _aligned(blocks: list[torch.Tensor]) -> bool:
    """Whether each block after the first would start a multiple of ``_ALIGNMENT`` bytes into their concatenation."""
    return all(offset % _ALIGNMENT == 0 for offset in itertools.accumulate(block.nbytes for block in blocks[:-1]))


def _joined(blocks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The tensor whose consecutive row blocks ``blocks`` are (contiguous, of one dtype, row width and storage, in
    order), or None."""
    first = blocks[0]
    if any(block is None or not _plain_tensor(block) for block in blocks):
        return None
    storage, offset, row = first.untyped_storage().data_ptr(), first.storage_offset(), math.prod(first.shape[1:])
    rows = 0
    for block in blocks:
        if not (block.is_contiguous() and block.dtype == first.dtype and block.shape[1:] == first.shape[1:]
                and block.untyped_storage().data_ptr() == storage and block.storage_offset() == offset + rows * row):
            return None
        rows += block.shape[0]
    return first.detach().as_strided((rows, *first.shape[1:]), first.stride())


def _outside_inference_mode() -> torch.inference_mode:
    """Parameters must stay normal tensors (an inference tensor refuses in-place updates outside inference mode, such
    as ``load_state_dict``'s), also where a model is wrapped or unwrapped inside ``torch.inference_mode()``."""
    return torch.inference_mode(False)


class SharedInputGEMM:
    """Forwards for a merged group's projections for one capture run, where the model calls them one by one on one
    input (attention's q, k and v): the first one called runs the group's GEMM and takes its columns; another called
    with that very tensor (the same object, unchanged since: the same version) takes its own columns of the output.
    One called with any other input, or again after it took its columns, computes its own linear. The output is dropped
    once every projection took its columns, and with this object (made anew for each run) at the latest."""

    def __init__(self, group: ProjectionGroup, weights: MergedWeights) -> None:
        self.group, self.weights = group, weights
        self._input: torch.Tensor | None = None
        self._version: int | None = None
        self._columns: dict[int, torch.Tensor] = {}  # projection index -> its columns, not yet handed out

    def forwards(self) -> dict[nn.Module, Callable]:
        return {linear: partial(self.forward, index) for index, linear in enumerate(self.group.linears)}

    def forward(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if not self._columns:
            self._columns = dict(enumerate(self.weights.split(self.weights.linear(x))))
            self._input, self._version = x, _version(x)
        elif not (x is self._input and _version(x) == self._version and index in self._columns):
            linear = self.group.linears[index]
            return functional.linear(x, linear.weight, linear.bias)
        columns = self._columns.pop(index)
        if not self._columns:
            self._input = None
        return columns


def _version(x: torch.Tensor) -> int | None:
    """``x``'s in-place update count; None for an inference tensor, which keeps none (a capture run under
    ``torch.inference_mode()``: the object's identity alone then tells the input)."""
    return None if x.is_inference() else x._version
