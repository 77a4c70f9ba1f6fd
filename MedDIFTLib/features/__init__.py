"""Voxel descriptors: the backbone contract, the registry of backbones, MIND-SSC, MAISI and their fusion."""

from .fused import FusedFeaturizer
from .protocol import FeatureLevel, FeaturePyramid, Featurizer
from .registry import (
    BACKBONES,
    BackboneSpec,
    FusedBackboneSpec,
    available_backbones,
    backbone_spec,
    create_featurizer,
)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureLevel",
    "FeaturePyramid",
    "Featurizer",
    "FusedBackboneSpec",
    "FusedFeaturizer",
    "available_backbones",
    "backbone_spec",
    "create_featurizer",
]
