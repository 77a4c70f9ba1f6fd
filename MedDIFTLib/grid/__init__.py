"""Grid tools below the engine and the field: trilinear sampling (:mod:`.sampling`), lengths and unit
vectors (:mod:`.vectors`), node grids (:mod:`.nodes`), pooled and cell grids (:mod:`.cells`), slabs
of slices (:mod:`.slabs`) and the one displacement field type (:mod:`.displacement_field`).

Volumes are ``(C, K, J, I)`` tensors on a :class:`MedDIFTLib.core.geometry.Geometry`; points are
LPS mm, voxel coordinates continuous ``ijk``.
"""
