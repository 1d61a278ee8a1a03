"""Wall time of reading PCD point clouds into the model's [8192,6] input, per DATA encoding (a
benchmark, not a test): the LZF decoder of binary_compressed is pure Python, so its cost depends
on how well the cloud compressed (a back-reference per few bytes of a smooth scan, literals for noise).

    uv run python bench/pcd_decode.py --points 200000

Two clouds of `--points` points with colour: noise (normal xyz, random colours; compresses badly)
and a scan (a smooth grid surface in row order with one colour; compresses well). Each file is
read once to warm up, then `--runs` times; the median is printed.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inputs_files import pcd_bytes  # noqa: E402  (the tests' PCD writer)

from server.media.decoders.points import point_tensor  # noqa: E402


def clouds(count: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(count)))
    u, v = np.meshgrid(np.linspace(0, 1, side), np.linspace(0, 1, side))
    grid = np.stack([u.ravel(), v.ravel(), 0.1 * np.sin(6 * u.ravel())], axis=1)[:count]
    return {"noise": (rng.normal(size=(count, 3)), rng.integers(0, 256, (count, 3))),
            "scan": (grid, np.tile([120, 130, 140], (count, 1)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    for name, (xyz, rgb) in clouds(args.points).items():
        for encoding in ("ascii", "binary", "binary_compressed"):
            data = pcd_bytes(xyz.astype(np.float32), rgb.astype(np.uint8), encoding)
            point_tensor(data)
            times = []
            for _ in range(args.runs):
                start = time.perf_counter()
                point_tensor(data)
                times.append(time.perf_counter() - start)
            print(f"{name:6s} {encoding:18s} {len(data) / 1e6:7.1f} MB  {statistics.median(times):6.2f} s")


if __name__ == "__main__":
    main()
