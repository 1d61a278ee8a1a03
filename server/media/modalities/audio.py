import torch
from torch import nn

from server.media.decoders.audio import audio_tensor
from server.media.modalities.base import Modality, limits


class AudioTokenizer(nn.Conv2d):
    """Fbank [B, 1, 128, 1024] -> [B, 1212, W]: 16x16 patches at stride 10, frequency rows x time columns."""

    @classmethod
    def from_weights(cls, weights: dict[str, torch.Tensor]) -> "AudioTokenizer":
        width, channels, k, _ = weights["weight"].shape
        return cls(channels, width, kernel_size=k, stride=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).flatten(2).transpose(1, 2)  # [B, W, 12, 101] -> [B, 1212, W]


MODALITY = Modality(
    name="audio",
    fields=("audio",),
    preprocess=lambda files, options: audio_tensor(  # [1, 128, 1024]
        files["audio"], "audio", **limits(options, max_duration_s="max_audio_seconds",
                                          max_sample_rate="max_audio_sample_rate",
                                          max_decode_mb="max_decode_mb", cancel="cancel")),
    tokenizer=AudioTokenizer.from_weights,
)
