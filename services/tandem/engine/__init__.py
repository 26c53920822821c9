"""The model runtime: no networking. `Engine` and `SamplingParams` are the public API.

The names below are imported lazily (PEP 562): `import tandem.engine.tokenizer` (the gateway
does) must not import torch through `tandem.engine.engine`. `from tandem.engine import Engine`
works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tandem.common.request import FinishReason as FinishReason
    from tandem.common.request import SamplingParams as SamplingParams
    from tandem.common.request import TokenLogprob as TokenLogprob
    from tandem.engine.config import EngineConfig as EngineConfig
    from tandem.engine.engine import Engine as Engine
    from tandem.engine.outputs import GenerationOutput as GenerationOutput
    from tandem.engine.outputs import RequestOutput as RequestOutput

_MODULES: dict[str, str] = {
    "Engine": "tandem.engine.engine",
    "EngineConfig": "tandem.engine.config",
    "FinishReason": "tandem.common.request",
    "GenerationOutput": "tandem.engine.outputs",
    "RequestOutput": "tandem.engine.outputs",
    "SamplingParams": "tandem.common.request",
    "TokenLogprob": "tandem.common.request",
}

__all__ = list(_MODULES)


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'tandem.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
