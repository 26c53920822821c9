"""The model runtime: no networking. `Engine` and `SamplingParams` are the public API.

The names below are imported lazily (PEP 562): `import tandem.engine.tokenizer` (the gateway
does) must not import torch through `tandem.engine.engine`. `from tandem.engine import Engine`
works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.engine.config import EngineConfig as EngineConfig
    from tandem.engine.engine import Engine as Engine
    from tandem.engine.engine import GenerationOutput as GenerationOutput
    from tandem.engine.engine import RequestOutput as RequestOutput
    from tandem.engine.sampling_params import SamplingParams as SamplingParams
    from tandem.engine.sequence import FinishReason as FinishReason
    from tandem.engine.sequence import TokenLogprob as TokenLogprob

_MODULES: dict[str, str] = {
    "Engine": "tandem.engine.engine",
    "EngineConfig": "tandem.engine.config",
    "FinishReason": "tandem.engine.sequence",
    "GenerationOutput": "tandem.engine.engine",
    "RequestOutput": "tandem.engine.engine",
    "SamplingParams": "tandem.engine.sampling_params",
    "TokenLogprob": "tandem.engine.sequence",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
