"""The model runtime: no networking. `Engine` and `SamplingParams` are the public API."""

from services.engine.config import EngineConfig
from services.engine.engine import Engine, GenerationOutput, RequestOutput
from services.engine.sampling_params import SamplingParams
from services.engine.sequence import FinishReason, TokenLogprob

__all__ = [
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationOutput",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
