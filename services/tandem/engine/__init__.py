"""The model runtime: no networking. `Engine` and `SamplingParams` are the public API."""

from tandem.engine.config import EngineConfig
from tandem.engine.engine import Engine, GenerationOutput, RequestOutput
from tandem.engine.sampling_params import SamplingParams
from tandem.engine.sequence import FinishReason, TokenLogprob

__all__ = [
    "Engine",
    "EngineConfig",
    "FinishReason",
    "GenerationOutput",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
