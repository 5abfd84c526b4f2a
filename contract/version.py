"""The installed edm-serve version (written into every PNG and shown by the API)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def software_version() -> str:
    try:
        return version("edm-serve")
    except PackageNotFoundError:
        return "0+unknown"
