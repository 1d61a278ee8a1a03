"""Lidar point clouds in ASPRS LAS (read by laspy): the scaled x, y, z and, where the point format
has them, the red, green and blue channels.

LAS stores colour in 16 bits a channel, but many writers put 8-bit values there: a cloud whose
channels never exceed 255 is read as 8-bit (÷255), any other as 16-bit (÷65535). LAZ (the same
format compressed) needs a decompression backend we do not ship, and is refused by name.
"""

import io

import laspy
import numpy as np

from server.errors import InputError
from server.media.decoders.costs import check_decode_memory

_EIGHT_BIT_MAX = 255


def las_points(data: bytes, param: str, max_points: int, max_decode_mb: float) -> np.ndarray:
    """[N,3] xyz, or [N,6] xyz + rgb in 0-1 for point formats with colour."""
    with laspy.open(io.BytesIO(data)) as reader:
        count, record = reader.header.point_count, reader.header.point_format.size
        if count > max_points:
            raise InputError(413, f"field '{param}' LAS file has {count} points, more than the limit of "
                                  f"{max_points} (max_points)", param)
        # the raw records, laspy's scaled copies of x, y, z, and the result with its copy
        check_decode_memory(count * (record + 24 + 96), max_decode_mb, param, f"a LAS cloud of {count} points")
        cloud = reader.read()
    xyz = np.stack([np.asarray(cloud.x), np.asarray(cloud.y), np.asarray(cloud.z)], axis=1).astype(np.float64)
    if "red" not in cloud.point_format.dimension_names:
        return xyz
    rgb = np.stack([np.asarray(cloud.red), np.asarray(cloud.green), np.asarray(cloud.blue)], axis=1)
    full_scale = _EIGHT_BIT_MAX if rgb.size == 0 or rgb.max() <= _EIGHT_BIT_MAX else 65535
    return np.concatenate([xyz, rgb / full_scale], axis=1)
