"""Who imports whom (docs/ARCHITECTURE.md): the worker never imports the gateway, the shared contract
imports neither side, and the math imports none of the three. Read from the source, so that a lazy
import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_FREE_MODEL = {"model.choices", "model.card", "model.download", "model.sources", "model.catalogue",
                    "model.numerics"}


def imports_of(package: str) -> dict[str, set[str]]:
    """File -> the top-level-qualified modules it imports (absolute imports only; we use no others)."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        if "grpc_gen" in path.parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names |= {f"{node.module}.{alias.name}" for alias in node.names}
        found[str(path.relative_to(ROOT))] = names
    return found


def offending(package: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    return {file: sorted(n for n in names if n.split(".")[0] in forbidden)
            for file, names in imports_of(package).items() if any(n.split(".")[0] in forbidden for n in names)}


def test_the_worker_never_imports_the_gateway() -> None:
    assert offending("worker", ("service",)) == {}


def test_the_contract_imports_neither_side_nor_torch() -> None:
    assert offending("contract", ("service", "worker", "torch")) == {}
    model = {file: sorted(n for n in names if n.startswith("model.") and n.rsplit(".", 1)[0] not in TORCH_FREE_MODEL
                          and n not in TORCH_FREE_MODEL)
             for file, names in imports_of("contract").items()}
    assert {file: names for file, names in model.items() if names} == {}


def test_the_math_imports_no_service_worker_or_contract() -> None:
    assert offending("model", ("service", "worker", "contract")) == {}


@pytest.mark.parametrize("module", sorted(TORCH_FREE_MODEL))
def test_the_model_modules_the_gateway_uses_do_not_import_torch(module: str) -> None:
    names = imports_of("model")[module.replace(".", "/") + ".py"]
    assert not any(n.split(".")[0] == "torch" for n in names)
