"""A request checked against its model's card and resolved into a JobSpec (pure; no I/O).

Every refusal is a 422 problem naming the field, except an unknown model (404, raised by the
caller, which knows the catalog). Sampler settings a request omits take the model card's
`recommended` values when it has them (the reference's defaults otherwise). The sampler settings
are checked as a whole: the schedule they give on the model is computed in float64
(model/numerics.py, the worker computes the same) and refused when the sampler could not compute it.
Values echoed in a refusal are cut to a bounded length.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable

from pydantic import ValidationError

from contract.jobs import SEED_LIMIT, JobSpec
from model.card import ModelCard
from model.numerics import SettingsError
from service.errors import Problem, invalid, shown
from service.schemas import JOB_ID_PATTERN, GenerateRequest

IDEMPOTENCY_KEY_MAX = 255
# Visible ASCII, spaces inside only: what an HTTP header and gRPC metadata both carry unchanged.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"
_CANONICAL_INDEX = re.compile(r"(0|[1-9][0-9]*)")


def known_job_id(job_id: str) -> str:
    """A job id in the form the API hands out; any other form names no job (404, with no lookup)."""
    if not re.fullmatch(JOB_ID_PATTERN, job_id):
        raise Problem(404, f"no job {shown(job_id)}")
    return job_id


def check_idempotency_key(value: str | None) -> str | None:
    """An Idempotency-Key as given (None: no key); empty, too long or not visible ASCII is a 422 naming the
    header. The REST dependency (service/deps.py) declares the same rule; gRPC metadata calls this."""
    if value is None:
        return None
    if not value:
        raise invalid("Idempotency-Key", "must not be empty (omit the header for no key)")
    if len(value) > IDEMPOTENCY_KEY_MAX or not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, value):
        raise invalid("Idempotency-Key", f"must be 1 to {IDEMPOTENCY_KEY_MAX} visible ASCII characters")
    return value


def random_seed() -> int:
    return secrets.randbelow(SEED_LIMIT)


def resolve_seeds(req: GenerateRequest, max_images: int, draw: Callable[[], int] = random_seed) -> list[int]:
    if req.seeds is not None:
        if req.count is not None or req.start is not None:
            raise invalid("count" if req.count is not None else "start", "give either seeds or count (+ start)")
        seeds = list(req.seeds)
        field = "seeds"
    elif req.count is not None:
        start = req.start or 0
        if start + req.count > SEED_LIMIT:
            raise invalid("count", f"seeds would run past {SEED_LIMIT - 1}")
        seeds = list(range(start, start + min(req.count, max_images + 1)))
        field = "count"
    else:
        seeds = [req.start if req.start is not None else draw()]
        field = "seeds"
    if len(seeds) > max_images:
        raise invalid(field, f"at most {max_images} images per request")
    return seeds


def resolve_class(value: int | str | None, card: ModelCard) -> int | None:
    """An index or a class name -> an index in 0..label_dim-1; None stays None (drawn per seed)."""
    if value is None:
        return None
    if card.label_dim == 0:
        raise invalid("class_label", f"model {card.name} is unconditional: omit class_label")
    if isinstance(value, str):
        names = card.class_names or []
        if value in names:
            return names.index(value)
        if not _CANONICAL_INDEX.fullmatch(value):  # ASCII digits only: "²".isdigit() is True, int() refuses it
            listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            raise invalid("class_label", f"unknown class {shown(value)}; expected an index or one of: {listed}"
                          if names else f"{shown(value)} is not a class index")
        if len(value) > len(str(card.label_dim)):  # out of range, and never int() of thousands of digits
            raise invalid("class_label", f"{shown(value)} is outside 0..{card.label_dim - 1}")
        value = int(value)
    if not 0 <= value < card.label_dim:
        raise invalid("class_label", f"{shown(value)} is outside 0..{card.label_dim - 1}")
    return value


def check_sampler(req: GenerateRequest, card: ModelCard, max_steps: int) -> None:
    if req.num_steps > max_steps:
        raise invalid("num_steps", f"at most {max_steps} steps")
    if req.sigma_min is not None and req.sigma_max is not None and req.sigma_min >= req.sigma_max:
        raise invalid("sigma_min", f"must be below sigma_max ({req.sigma_max})")
    if req.sigma_min is not None and req.sigma_min >= card.sigma_max:
        raise invalid("sigma_min", f"must be below the model's highest noise level {card.sigma_max}")
    if req.sigma_max is not None and req.sigma_max <= card.sigma_min:
        raise invalid("sigma_max", f"must be above the model's lowest noise level {card.sigma_min}")
    if req.S_max is not None and req.S_max < req.S_min:
        raise invalid("S_max", f"must be >= S_min ({req.S_min})")
    try:
        req.sampler().schedule_on(card)
    except SettingsError as error:
        raise invalid(error.field, error.message) from None


def with_recommended(req: GenerateRequest, card: ModelCard) -> GenerateRequest:
    """Sampler settings the request omits take the card's recommended values (e.g. 256 steps with
    churn for ImageNet-64); settings the request gives, even at their defaults, are kept."""
    omitted = {k: v for k, v in (card.recommended or {}).items() if k not in req.model_fields_set}
    if not omitted:
        return req
    body = {**req.model_dump(include=req.model_fields_set), **omitted}
    try:
        return GenerateRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "model"
        raise invalid(field, f"model {card.name}'s recommended setting is invalid: {first['msg']}") from None


def resolve(req: GenerateRequest, model: str, card: ModelCard, *, max_images: int, max_steps: int,
            draw: Callable[[], int] = random_seed) -> JobSpec:
    req = with_recommended(req, card)
    check_sampler(req, card, max_steps)
    label = resolve_class(req.class_label, card)
    seeds = resolve_seeds(req, max_images, draw)
    return JobSpec(model=model, seeds=seeds, class_labels=[label] * len(seeds), sampler=req.sampler())
