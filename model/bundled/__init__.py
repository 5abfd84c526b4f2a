"""The model shipped with edm-serve: a class-conditional 8x8 digits model trained by `edm-serve train`
(its card records the exact command, data, steps, wall time and measured quality)."""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).with_name("edm-digits-8x8-cond.json")
