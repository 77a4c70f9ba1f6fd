"""The correspondence engine: fixed points (LPS mm) matched into the moving volume.

One similarity (:mod:`.similarity`: the fused multi-level patch cosine, defined once, with a
reference and a fast evaluation) in two layouts: a set of points (:func:`match_points`,
:mod:`.points`, with its local and dense searches) and a lattice of fixed points
(:func:`match_lattice`, :mod:`.lattice`, what the dense field is fitted from). Both search a
candidate lattice (:mod:`.candidates`) with descriptors read at points (:mod:`.descriptors`),
refine the best by one parabola (:mod:`.subvoxel`; points then by a pattern search on the finest
level), check forward-backward and return :class:`Correspondences` with one confidence formula in
mm (:mod:`.correspondences`).
"""

from .correspondences import Correspondences, confidence
from .descriptors import sample_descriptors
from .lattice import LatticeMatches, match_lattice
from .points import check_points, match_points

__all__ = [
    "Correspondences",
    "LatticeMatches",
    "check_points",
    "confidence",
    "match_lattice",
    "match_points",
    "sample_descriptors",
]
