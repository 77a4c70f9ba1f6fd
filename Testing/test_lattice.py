"""Lattice layout helpers: the separable similarity aggregation equals the box mean it replaces,
and channels-last sampling gives the same samples as the plain layout."""

import torch
import torch.nn.functional as F

from MedDIFTLib.core.geometry import Geometry
from MedDIFTLib.matching.lattice import _aggregate
from MedDIFTLib.matching.nodes import channels_last
from MedDIFTLib.matching.sampling import sample


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
