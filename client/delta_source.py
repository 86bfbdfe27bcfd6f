"""A round's difference Δ = trained − start, computed a piece at a time as the encoder reaches it.

The worker used to take Δ as a dict of full tensors: a second fp32 copy of
the trainable state beside the round's start, and one more on the host for a
model that trains on an accelerator. :class:`Difference` holds no values of
its own. The encoder (common.codec.encode, through ``PieceSource``) asks for
elements ``[start, start + count)`` of one tensor at a time, at most a shard's
worth, and each is subtracted then, in fp32, exactly as a whole-tensor
subtraction would (IEEE subtraction is elementwise), so the payload is bit
for bit what it was. The trained values are read where training left them:
the model's parameters, on whatever device, and the optimizer tensors that
travel with a FedCyBGD block.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from common.delta import TensorSpec
from common.dtypes import from_torch


def trained_values(
    model: Any, trainable: Sequence[str], moved: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The trained tensors by name, without a copy: the model's trainable parameters, then ``moved``.

    ``moved``: tensors that are not parameters (optimizer state travelling with a
    round); a name in both is read from the model.
    """
    params = dict(model.named_parameters())
    values = {name: tensor for name, tensor in moved.items() if name not in params}
    values.update({name: params[name].detach() for name in trainable})
    return values


class Difference(Mapping[str, torch.Tensor]):
    """Δ[name] = trained[name] − start[name] over ``names``, each value computed when asked for.

    As a ``PieceSource`` it gives a shard's piece of one tensor at a time
    (memory of one piece); as a ``Mapping`` one whole tensor at a time (what a
    lossy codec's error feedback works through). Both sides must keep their
    values until the encoding is done.
    """

    def __init__(
        self,
        trained: Mapping[str, torch.Tensor],
        start: Mapping[str, torch.Tensor],
        names: Sequence[str],
    ) -> None:
        specs = []
        for name in names:
            if name not in trained or name not in start:
                side = "the trained state" if name not in trained else "the round's start"
                raise KeyError(f"tensor {name!r} of the upload is missing from {side}")
            a, b = trained[name], start[name]
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(
                    f"tensor {name!r} trained to shape {list(a.shape)}; it started as {list(b.shape)}"
                )
            dtype = torch.promote_types(torch.float32, b.dtype)
            specs.append(TensorSpec(name, from_torch(dtype), tuple(b.shape)))
        self._trained = trained
        self._start = start
        self.manifest: tuple[TensorSpec, ...] = tuple(specs)
        self._names = {spec.name: spec for spec in self.manifest}

    def piece(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened Δ[name], a fresh CPU tensor."""
        end = start + count
        trained = _flat(self._trained[name])[start:end].to("cpu", torch.float32)
        return trained - _flat(self._start[name])[start:end]

    def __getitem__(self, name: str) -> torch.Tensor:
        spec = self._names[name]
        return self.piece(name, 0, spec.numel).reshape(spec.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    # A parameter or a held tensor is contiguous: reshape is a view, not a copy.
    return tensor.detach().reshape(-1)
