from server.media.decoders.audio import audio_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="audio",
    fields=("audio",),
    preprocess=lambda files, decoding: audio_tensor(  # [1, 128, 1024]
        files["audio"], "audio", max_duration_s=decoding.limits.max_audio_seconds,
        max_sample_rate=decoding.limits.max_audio_sample_rate, max_decode_mb=decoding.limits.max_decode_mb,
        cancel=decoding.cancel),
    formats=("WAV (PCM, float, 8-bit), FLAC, OGG/Opus, MP3, M4A/AAC, AIFF, any rate: first channel, resampled to 16 kHz, "
             "128-bin fbank of the first 10.24 s"),
)
