"""What one modality is to the gateway: the upload fields that carry it and its preprocessing.
(What it is to the network, its tokenizer, is in server/model/tokenizers.)"""

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from server.config import DecoderLimits


@dataclass(frozen=True)
class Decoding:
    """How one attachment is decoded: the gateway's limits, and what its request adds."""

    limits: DecoderLimits
    cancel: threading.Event | None = None  # set once nobody waits for the result: the decoder stops
    imu_sample_rate: float | None = None  # Hz of an IMU series, as its request says (None: from the file)


Preprocess = Callable[[Mapping[str, bytes], Decoding], torch.Tensor]


@dataclass(frozen=True)
class Modality:
    name: str  # as in the checkpoint (`resample_tokens.<name>`, ...)
    fields: tuple[str, ...]  # upload fields that together make one attachment
    preprocess: Preprocess  # files by field, decoding -> one model input (no batch dim)
    formats: str = ""  # what the modality's own upload field accepts and how each format is read
