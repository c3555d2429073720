"""The MAPEX model: config, mixture-of-modality-experts layer, encoder + MAE decoder."""

from mapex_core.model.config import MapexConfig
from mapex_core.model.mapex import EncoderOutput, MAEOutput, MapexModel
from mapex_core.model.moe import FeedForward, MoELayer
from mapex_core.model.routing import RoutingStats, collect_routing_stats
from mapex_core.model.serialization import load_model, save_model

__all__ = [
    "EncoderOutput",
    "FeedForward",
    "MAEOutput",
    "MapexConfig",
    "MapexModel",
    "MoELayer",
    "RoutingStats",
    "collect_routing_stats",
    "load_model",
    "save_model",
]
