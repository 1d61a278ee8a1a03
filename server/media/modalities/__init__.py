"""The registry of modalities. A new modality is one file in this folder plus one line here."""

from server.media.modalities import audio, fmri, image, imu, point, rgbd, rgbn, video
from server.media.modalities.base import Modality

MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        image.MODALITY,
        video.MODALITY,
        audio.MODALITY,
        point.MODALITY,
        rgbd.MODALITY,
        rgbn.MODALITY,
        fmri.MODALITY,
        imu.MODALITY,
    )
}
