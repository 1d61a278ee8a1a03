"""Point clouds and meshes → the [8192,6] xyz+rgb tensor of ONELLM.md §4."""

import io
import logging
import threading

import numpy as np
import torch
import trimesh

from server.errors import Cancelled, InputError
from server.media.decoders.arrays import load_array
from server.media.decoders.costs import MAX_DECODE_MB
from server.media.decoders.las import las_points
from server.media.decoders.pcd import pcd_points
from server.media.sniff import check_kind, undecodable

N_POINTS = 8192
MAX_POINTS = 20_000_000
SEED = 0  # surface sampling is random in form only: the same file gives the same points

_EXPECTED = "a point cloud or mesh (.npy, CSV, PLY, PCD, LAS, OBJ, GLB, OFF, STL)"
_TRIMESH_TYPES = {"PLY": "ply", "OBJ": "obj", "GLB": "glb", "OFF": "off", "STL": "stl"}

# trimesh logs every oddity of a file it still manages to load; uploads are not our logs.
logging.getLogger("trimesh").setLevel(logging.ERROR)


def point_tensor(data: bytes, param: str = "point", n_points: int = N_POINTS,
                 max_points: int = MAX_POINTS, *, max_decode_mb: float = MAX_DECODE_MB,
                 cancel: threading.Event | None = None) -> torch.Tensor:
    """[n_points,6]: xyz centred on its mean and divided by its largest norm, rgb in 0–1.

    - `.npy` / CSV [N,6] (rgb kept as given) or [N,3] (rgb = 0).
    - meshes (faces present): n_points sampled uniformly on the surface with a fixed seed,
      colours interpolated from vertex colours, or the face's colour, or texture colours
      at the vertices, else 0.
    - point clouds (no faces): the vertices with their colours (else 0); PCD (pcd.py) and LAS
      (las.py) the same way, a PCD's points with a non-finite coordinate dropped.
    N is then brought to n_points: more points → evenly strided subsample (indices
    floor(i·N/n_points), cheap and order-preserving); fewer → repeated cyclically.
    Normalisation comes last, so the returned xyz have mean 0 and max norm 1 exactly."""
    kind = check_kind(data, param, {"array", "mesh", "points", "text"}, _EXPECTED)
    if kind is None:
        raise InputError(415, f"field '{param}' is in no format we can read, expected {_EXPECTED}",
                         param)
    if kind.family == "mesh":
        points = _load_geometry(data, param, kind, n_points)
    elif kind.family == "points":
        points = _load_point_cloud(data, param, kind, max_points, max_decode_mb, cancel)
    else:  # .npy, or CSV / XYZ text
        points = _from_array(load_array(data, param, max_values=6 * max_points,
                                        limit=f"6 × {max_points} (max_points)",
                                        max_decode_mb=max_decode_mb, cancel=cancel), param)
    if not np.isfinite(points).all():
        raise InputError(422, f"field '{param}' contains NaN or infinite coordinates", param)
    if len(points) == 0:
        raise InputError(422, f"field '{param}' holds no points", param)
    if len(points) > max_points:
        raise InputError(413, f"field '{param}' has {len(points)} points, more than the limit "
                              f"of {max_points} (max_points)", param)
    # brought to n_points before rgb = 0 is added to [N,3] arrays: the same, without a full-size copy
    return torch.from_numpy(np.ascontiguousarray(_normalize(_with_rgb(_resize(points, n_points))),
                                                 dtype=np.float32))


def _from_array(array: np.ndarray, param: str) -> np.ndarray:
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise InputError(422, f"field '{param}' has shape {list(array.shape)}, expected [N,6] "
                              "(xyz + rgb in 0–1) or [N,3]", param)
    return array


def _with_rgb(points: np.ndarray) -> np.ndarray:
    if points.shape[1] == 3:
        return np.concatenate([points, np.zeros_like(points)], axis=1)
    return points


def _load_geometry(data: bytes, param: str, kind, n_points: int) -> np.ndarray:
    try:
        geometry = trimesh.load(io.BytesIO(data), file_type=_TRIMESH_TYPES[kind.name])
        if isinstance(geometry, trimesh.Scene):
            if not geometry.geometry:
                raise ValueError("the scene holds no geometry")
            geometry = geometry.to_geometry()
        if isinstance(geometry, trimesh.Trimesh) and len(geometry.faces) > 0:
            return _sample_surface(geometry, n_points)
        if isinstance(geometry, (trimesh.Trimesh, trimesh.PointCloud)):
            return _vertices_with_colours(geometry)
        raise ValueError(f"it holds a {type(geometry).__name__}, not a mesh or point cloud")
    except InputError:
        raise
    except Exception as error:  # trimesh's parsers raise whatever their input provokes
        raise undecodable(param, kind, _EXPECTED, error) from error


def _load_point_cloud(data: bytes, param: str, kind, max_points: int, max_decode_mb: float,
                      cancel: threading.Event | None) -> np.ndarray:
    if kind.name == "LAZ":
        raise InputError(415, f"field '{param}' holds a LAZ file (compressed LAS), which we do not read: "
                              "decompress it to LAS (laszip, PDAL) or send PLY or PCD", param)
    try:
        if kind.name == "LAS":
            points = las_points(data, param, max_points, max_decode_mb)
        else:
            points = pcd_points(data, param, max_points, max_decode_mb, cancel)
    except (InputError, Cancelled):
        raise
    except Exception as error:  # laspy's and our PCD parser's complaints about a damaged file
        raise undecodable(param, kind, _EXPECTED, error) from error
    return points


def _sample_surface(mesh: trimesh.Trimesh, count: int) -> np.ndarray:
    areas = mesh.area_faces
    if not np.isfinite(areas).all() or areas.sum() <= 0:
        return _vertices_with_colours(mesh)  # degenerate faces: nothing to sample on
    rng = np.random.default_rng(SEED)
    faces = rng.choice(len(areas), size=count, p=areas / areas.sum())
    # Uniform barycentric coordinates: pairs falling outside the triangle are reflected in.
    u, v = rng.random(count), rng.random(count)
    outside = u + v > 1
    u[outside], v[outside] = 1 - u[outside], 1 - v[outside]
    weights = np.stack([1 - u - v, u, v], axis=1)
    corners = mesh.vertices[mesh.faces[faces]]  # [count, 3, 3]
    xyz = np.einsum("nk,nkd->nd", weights, corners)
    return np.concatenate([xyz, _surface_colours(mesh, faces, weights)], axis=1)


def _surface_colours(mesh: trimesh.Trimesh, faces: np.ndarray, weights: np.ndarray) -> np.ndarray:
    visual = mesh.visual
    if visual.kind == "texture":
        try:
            visual = visual.to_color()  # texture looked up at each vertex's UV
        except Exception:  # a texture without an image or UVs: no colour to be had
            return np.zeros((len(faces), 3))
    if visual.kind == "face":
        return _rgb(visual.face_colors[faces])
    if visual.kind == "vertex":
        corner_colours = _rgb(visual.vertex_colors[mesh.faces[faces]])  # [count, 3, 3]
        return np.einsum("nk,nkd->nd", weights, corner_colours)
    return np.zeros((len(faces), 3))


def _vertices_with_colours(geometry) -> np.ndarray:
    xyz = np.asarray(geometry.vertices, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[1] != 3:  # a cut-off file can leave vertices of one coordinate
        raise ValueError(f"its vertices have shape {list(xyz.shape)}, not [N, 3]")
    colours = geometry.colors if isinstance(geometry, trimesh.PointCloud) else (
        geometry.visual.vertex_colors if geometry.visual.kind == "vertex" else [])
    rgb = _rgb(colours) if len(colours) == len(xyz) else np.zeros_like(xyz)
    return np.concatenate([xyz, rgb], axis=1)


def _rgb(colours) -> np.ndarray:
    """trimesh colours are uint8 RGBA: keep RGB, scale to 0–1."""
    return np.asarray(colours, dtype=np.float64)[..., :3] / 255.0


def _resize(points: np.ndarray, count: int) -> np.ndarray:
    if len(points) >= count:
        return points[np.arange(count) * len(points) // count]
    return points[np.arange(count) % len(points)]


def _normalize(points: np.ndarray) -> np.ndarray:
    xyz = points[:, :3] - points[:, :3].mean(axis=0)
    scale = np.linalg.norm(xyz, axis=1).max()
    if scale > 0:  # a single repeated point stays at the origin
        xyz = xyz / scale
    return np.concatenate([xyz, points[:, 3:]], axis=1)
