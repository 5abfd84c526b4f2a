"""The gateway never imports torch: its image is small and it starts in a second."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.servers import ROOT

PROBE = """
import sys
from service.app import create_app
from service.settings import GatewaySettings
import service.main, service.up, service.cli, contract.jobs, contract.ledger, service.ledger, service.catalog
app = create_app(GatewaySettings())
assert app.state.catalog.card("tiny", dict).label_dim == 10
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("LEAKED" if leaked else "CLEAN", leaked[:5])
"""


def test_gateway_app_factory_does_not_import_torch(tiny_model: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDM_")}
    env.update({"EDM_MODELS": json.dumps({"tiny": str(tiny_model)}), "EDM_BUNDLED_MODEL": "false",
                "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)})
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CLEAN"), out.stdout
