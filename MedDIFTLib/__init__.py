"""MedDIFT: training-free 3D point correspondence from pretrained network features.

World coordinates inside this package are LPS millimetres; voxel indices are 0-based
``ijk`` in SimpleITK order (i fastest). See DESIGN.md for the conventions.
"""

__version__ = "0.1.0"
