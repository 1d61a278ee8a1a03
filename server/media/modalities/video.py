from server.media.decoders.video import video_tensor
from server.media.modalities.base import Modality

MODALITY = Modality(
    name="video",
    fields=("video",),
    preprocess=lambda files, decoding: video_tensor(  # [15, 3, 224, 224]
        files["video"], "video", max_duration_s=decoding.limits.max_video_seconds,
        max_frame_pixels=decoding.limits.max_video_frame_pixels,
        max_decoded_frames=decoding.limits.max_video_decoded_frames,
        max_decoded_pixels=decoding.limits.max_video_decoded_pixels,
        max_decode_mb=decoding.limits.max_decode_mb, cancel=decoding.cancel),
    formats=("MP4, MOV, MKV, WebM, AVI (H.264, HEVC, AV1, VP8/9, MPEG-4): five 1 s clips, their first frames, display "
             "rotation applied, three crops each"),
)
