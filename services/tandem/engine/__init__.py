"""The model runtime: no networking. `Engine` and `SamplingParams` are the public API."""

from tandem.common.request import FinishReason, SamplingParams, TokenLogprob
from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine, GenerationOutput, RequestOutput

__all__ = [
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationOutput",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
