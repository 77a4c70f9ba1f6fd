"""Voxel descriptors: the backbone contract, the registry of backbones, MIND-SSC and MAISI."""

from .protocol import FeatureLevel, FeaturePyramid, Featurizer
from .registry import BACKBONES, available_backbones, create_featurizer

__all__ = ["BACKBONES", "FeatureLevel", "FeaturePyramid", "Featurizer", "available_backbones", "create_featurizer"]
