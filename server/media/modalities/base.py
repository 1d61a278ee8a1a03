"""What one modality is: the upload fields that carry it, its preprocessing, its tokenizer."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Preprocess = Callable[[Mapping[str, bytes], Mapping[str, Any]], torch.Tensor]


def limits(options: Mapping[str, Any], **names: str) -> dict[str, Any]:
    """Decoder keyword arguments from the preprocess options: {argument: options[option]} for
    each `argument=option` given, when the gateway set that option (else the decoder's default)."""
    return {argument: options[option] for argument, option in names.items() if option in options}


@dataclass(frozen=True)
class Modality:
    name: str  # as in the checkpoint (`resample_tokens.<name>`, ...)
    fields: tuple[str, ...]  # upload fields that together make one attachment
    preprocess: Preprocess  # files by field, options -> one model input (no batch dim)
    # builds the modality's own tokenizer from its `conv1.<name>.*` tensors; None: CLIP's patch
    # conv over frames [T, 3, H, W] with the trunk output averaged over T
    tokenizer: Callable[[dict[str, torch.Tensor]], nn.Module] | None = None
