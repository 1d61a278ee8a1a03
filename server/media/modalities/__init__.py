"""The registry of modalities. A new modality is one file in this folder plus one line here (and,
when it is not read as frames, its tokenizer in server/model/tokenizers)."""

from collections.abc import Mapping

import torch

from server.errors import Cancelled, InputError
from server.media.modalities import audio, fmri, image, imu, point, rgbd, rgbn, video
from server.media.modalities.base import Decoding, Modality

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


def preprocess(modality: str, files: Mapping[str, bytes], decoding: Decoding) -> torch.Tensor:
    """One attachment's files -> its model input; a decoder failing in a way it did not foresee
    is still the file's fault (422 naming its last field)."""
    try:
        return MODALITIES[modality].preprocess(files, decoding)
    except (InputError, Cancelled):  # Cancelled: nobody waits for this result any more
        raise
    except Exception as e:  # noqa: BLE001 - untrusted bytes can break a decoder in any way
        field_name = next(reversed(files))
        raise InputError(422, f"could not read the '{field_name}' upload: {type(e).__name__}", field_name) from None
