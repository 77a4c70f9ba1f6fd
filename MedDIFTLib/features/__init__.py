"""Voxel descriptors: the backbone contract, the registry of backbones, MIND-SSC and MAISI."""

from .protocol import FeatureLevel, FeaturePyramid, Featurizer
from .registry import BACKBONES, BackboneSpec, available_backbones, backbone_spec, create_featurizer

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "FeatureLevel",
    "FeaturePyramid",
    "Featurizer",
    "available_backbones",
    "backbone_spec",
    "create_featurizer",
]
