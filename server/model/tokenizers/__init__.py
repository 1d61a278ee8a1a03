"""The modalities' own tokenizers: the first layer of the encoder for inputs that are not frames.

A modality without one (image, video, rgbd, rgbn) goes through CLIP's patch conv frame by frame,
its trunk output averaged over the frames. Each builder takes the modality's `conv1.<name>.*`
tensors and returns the module, with its shape read off them.
"""

from collections.abc import Callable

import torch
from torch import nn

from server.model.tokenizers.audio import AudioTokenizer
from server.model.tokenizers.fmri import FmriTokenizer
from server.model.tokenizers.imu import ImuTokenizer
from server.model.tokenizers.point import PointTokenizer

TOKENIZERS: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {
    "audio": AudioTokenizer.from_weights,
    "point": PointTokenizer.from_weights,
    "fmri": FmriTokenizer.from_weights,
    "imu": ImuTokenizer.from_weights,
}
