"""The sampler's choices and its cost in network evaluations, defined once (no torch): the sampler,
the job contract, the gateway's validation and the CLI import them from here."""

from __future__ import annotations

from typing import Literal, get_args

Solver = Literal["euler", "heun"]
Discretization = Literal["vp", "ve", "iddpm", "edm"]
Schedule = Literal["vp", "ve", "linear"]
Scaling = Literal["vp", "none"]

SOLVERS: tuple[str, ...] = get_args(Solver)
DISCRETIZATIONS: tuple[str, ...] = get_args(Discretization)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
SCALINGS: tuple[str, ...] = get_args(Scaling)


def nfe_per_image(num_steps: int, solver: str | None) -> int:
    """Network evaluations (NFE) per image: N for Euler; 2N - 1 for Heun (the default), whose last
    step is a plain Euler step."""
    return num_steps if solver == "euler" else 2 * num_steps - 1
