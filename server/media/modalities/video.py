from server.media.decoders.video import video_tensor
from server.media.modalities.base import Modality, limits

MODALITY = Modality(
    name="video",
    fields=("video",),
    preprocess=lambda files, options: video_tensor(  # [15, 3, 224, 224]
        files["video"], "video", **limits(options, max_duration_s="max_video_seconds",
                                          max_frame_pixels="max_frame_pixels",
                                          max_decoded_frames="max_decoded_frames",
                                          max_decoded_pixels="max_decoded_pixels",
                                          max_decode_mb="max_decode_mb", cancel="cancel")),
)
