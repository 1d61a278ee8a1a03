"""Furthest-point sampling and neighbour grouping on clouds whose answer is known by hand."""

import torch

from server.model.tokenizers.point import PointTokenizer, furthest_point_sample, group_neighbours


def line_cloud(n: int) -> torch.Tensor:
    """n points on the x axis at 0, 1, ..., n-1 in channels 3:6; channels 0:3 hold decoys."""
    cloud = torch.zeros(1, n, 6)
    cloud[0, :, 3] = torch.arange(n, dtype=torch.float32)
    cloud[0, :, :3] = torch.randn(n, 3, generator=torch.Generator().manual_seed(1)) * 100
    return cloud


def test_fps_starts_at_zero_then_takes_the_furthest_with_first_index_on_ties():
    cloud = line_cloud(10)
    # 0 first; 9 is furthest from {0}; 4 and 5 are both 4 away from {0, 9}: the first index wins
    assert furthest_point_sample(cloud[..., 3:], 3).tolist() == [[0, 9, 4]]


def test_fps_measures_distance_to_the_whole_chosen_set():
    xyz = torch.tensor([[[0.5, 0.5, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]]])
    # after the centre (index 0) and the first corner, every other corner is still nearest to
    # the centre (not to the last pick), so all tie and the lowest index, 2, comes next
    assert furthest_point_sample(xyz, 3).tolist() == [[0, 1, 2]]
    far = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [10, 0, 0], [5, 0, 0]]])
    assert furthest_point_sample(far, 3).tolist() == [[0, 2, 3]]


def test_groups_hold_the_nearest_points_raw_channels():
    cloud = line_cloud(10)
    coords = cloud[..., 3:]
    groups = group_neighbours(cloud, coords, torch.tensor([[0, 9]]), k=3)  # [1, 6, 2, 3]
    assert sorted(groups[0, 3, 0].tolist()) == [0.0, 1.0, 2.0]
    assert sorted(groups[0, 3, 1].tolist()) == [7.0, 8.0, 9.0]
    # channels 0:3 are gathered as they are (raw, not centre-relative)
    assert sorted(groups[0, 0, 0].tolist()) == sorted(cloud[0, :3, 0].tolist())


def test_tokenizer_samples_on_channels_3_to_6_only():
    torch.manual_seed(0)
    cloud = torch.rand(2, 2048, 6)
    tokenizer = PointTokenizer(channels=6, width=8)
    tokens = tokenizer(cloud)
    assert tokens.shape == (2, 1024, 8)
    shuffled_decoys = cloud.clone()
    shuffled_decoys[..., :3] = cloud[..., :3].flip(1)  # moves channels 0:3 between points
    centres = furthest_point_sample(cloud[..., 3:], 1024)
    assert torch.equal(centres, furthest_point_sample(shuffled_decoys[..., 3:], 1024))
    assert not torch.equal(centres, furthest_point_sample(cloud[..., :3], 1024))
