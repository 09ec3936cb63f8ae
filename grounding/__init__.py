"""Grounding DINO (arXiv 2303.05499) in pure PyTorch.

import grounding
detector = grounding.load_detector()              # official SwinT-OGC from the Hub
dets = detector.predict(image, "a cat . a remote control .")
"""

from grounding.build import load_detector, save_detector
from grounding.config import GroundingDINOConfig, SwinConfig, swinb_cogcoor, swint_ogc
from grounding.model import GroundingDINO, GroundingOutput, build_model
from grounding.postprocess import Detections
from grounding.predictor import Detector, RawPrediction

__all__ = [
    "Detections",
    "Detector",
    "GroundingDINO",
    "GroundingDINOConfig",
    "GroundingOutput",
    "RawPrediction",
    "SwinConfig",
    "build_model",
    "load_detector",
    "save_detector",
    "swinb_cogcoor",
    "swint_ogc",
]
