"""Lattice layout helpers: the separable similarity aggregation equals the box mean it replaces,
and channels-last sampling (or sampling split among threads) gives the same samples as the plain layout."""

import torch
import torch.nn.functional as F

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.grid.sampling import channels_last, sample
from MedDIFTLib.matching.lattice import _aggregate


def test_aggregation_is_the_replicate_padded_box_mean():
    grid = Geometry.create((7, 6, 5), (4.0, 4.0, 4.0), (0.0, 0.0, 0.0), ((1, 0, 0), (0, 1, 0), (0, 0, 1)))
    scores = torch.randn((9, grid.num_voxels), generator=torch.Generator().manual_seed(0))
    for nodes in (1, 2):
        padded = F.pad(scores.reshape(1, 9, *grid.shape_kji), (nodes,) * 6, mode="replicate")
        expected = F.avg_pool3d(padded, 2 * nodes + 1, stride=1)[0].reshape(9, -1)
        assert torch.allclose(_aggregate(scores, grid, nodes), expected, atol=1e-6)
    assert torch.equal(_aggregate(scores, grid, 0), scores)


def test_channels_last_sampling_gives_the_same_samples():
    generator = torch.Generator().manual_seed(1)
    values = torch.randn((24, 6, 7, 8), generator=generator)
    ijk = torch.rand((50, 3), generator=generator) * torch.tensor([9.0, 8.0, 7.0]) - 0.5  # some beyond the border
    stored = channels_last(values)
    assert stored.stride(0) == 1 and torch.equal(stored, values)
    assert torch.allclose(sample(stored, ijk), sample(values, ijk), atol=1e-6)


def test_sampling_split_among_threads_gives_the_same_samples():
    """Many points of one volume are sampled in one part per thread: the same values, in order."""
    from MedDIFTLib.grid.sampling import SPLIT_POINTS

    generator = torch.Generator().manual_seed(2)
    values = torch.randn((5, 6, 7, 8), generator=generator)
    count = 3 * SPLIT_POINTS + 17  # not a multiple of the parts
    ijk = torch.rand((count, 3), generator=generator) * torch.tensor([9.0, 8.0, 7.0]) - 0.5
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = sample(values, ijk)
        torch.set_num_threads(3)
        split = sample(values, ijk)
    finally:
        torch.set_num_threads(threads)
    assert split.shape == (count, 5)
    assert torch.equal(split, whole)


def test_unit_vectors_and_lengths_equal_normalize_and_norm():
    from MedDIFTLib.grid.vectors import unit_vectors, vector_lengths

    values = torch.randn((4, 12, 9), generator=torch.Generator().manual_seed(3))
    values[1, :, 2] = 0.0  # a zero vector stays zero, as F.normalize leaves it
    for dim in (0, 1, 2):
        assert torch.allclose(unit_vectors(values, dim), F.normalize(values, dim=dim), atol=1e-6)
        assert torch.allclose(vector_lengths(values, dim), values.norm(dim=dim), atol=1e-5)
    assert torch.equal(unit_vectors(values, 1)[1, :, 2], torch.zeros(12))
