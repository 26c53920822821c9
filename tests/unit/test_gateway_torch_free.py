"""The gateway process never imports torch (issue 13): it reads the tokenizer, the chat template and
config.json, never the weights, so torch would only cost it memory and start-up time.

Checked in a fresh interpreter, because this test session has long imported torch: the `tandem`
command's module, the module `tandem gateway` runs (`tandem.gateway.server`), and a whole app
built on a `GatewayState`, so that imports done at construction count too.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = """
import json, sys
from pathlib import Path

import tandem.cli
import tandem.gateway.server
from tandem.gateway.app import create_app
from tandem.gateway.config import GatewayConfig
from tandem.gateway.state import GatewayState

# No Redis is needed: clients connect on first use, and nothing here uses them.
create_app(GatewayState(GatewayConfig(model_dir=Path(sys.argv[1]), redis_url="redis://127.0.0.1:1")))
loaded = sorted(sys.modules)
print(json.dumps({
    "torch": [m for m in loaded if m == "torch" or m.startswith("torch.")],
    "tandem": [m for m in loaded if m.startswith("tandem.")],
}))
"""


def test_gateway_process_does_not_import_torch(tiny_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(tiny_model_dir)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert "tandem.gateway.app" in modules["tandem"]
    assert modules["torch"] == [], f"torch imported; tandem modules loaded: {modules['tandem']}"
