"""Strict, bounded parsing over real HTTP: numbers have one rule per kind, settings the sampler cannot
compute are 422s naming the field, over-long values get a bounded answer, path parameters have one
canonical form."""

from __future__ import annotations

import pytest

from tests.service.test_gateway import Start, assert_problem, gateway  # noqa: F401

LONG = 10_000


@pytest.mark.parametrize(("body", "field"), [
    ('{"num_steps": 18.0}', "num_steps"),
    ('{"count": 1.0}', "count"),
    ('{"sigma_min": true}', "sigma_min"),
    ('{"class_label": true}', "class_label"),
    ('{"sigma_max": 1e30}', "sigma_max"),       # finite in float64; its square is not in float32
    ('{"rho": 5e-324}', "rho"),
    ('{"rho": 0.001}', "rho"),                  # 80^1000 overflows
    ('{"rho": 0.2}', "rho"),                    # inside the bounds, but the last step is 0 in float64
    ('{"sigma_min": 90}', "sigma_min"),         # above the default sigma_max (80): steps would go up
    ('{"sigma_min": 90, "discretization": "iddpm"}', "sigma_min"),
    ('{"class_label": "' + "1" * 4301 + '"}', "class_label"),  # was a 500 (Python's int-string limit)
    ('{"class_label": "' + "1" * 4300 + '"}', "class_label"),  # was a 422 echoing all 4,300 digits
    ('{"' + "k" * LONG + '": 1}', "k" * 200 + f"... ({LONG} characters)"),
])
def test_refusals_are_422s_naming_the_field_with_a_bounded_answer(gateway: Start, body: str,  # noqa: F811
                                                                   field: str) -> None:
    client = gateway()
    for path in ("/v1/jobs", "/v1/generate"):
        response = client.post(path, content=body, headers={"Content-Type": "application/json"})
        assert_problem(response, 422, field)
        assert len(response.content) < 2000, response.text


def test_integers_are_numbers_where_a_number_is_asked(gateway: Start) -> None:  # noqa: F811
    response = gateway().post("/v1/jobs", json={"seeds": [1], "rho": 7, "S_churn": 1, "S_max": 50, "num_steps": 4})
    assert response.status_code == 202, response.text


def test_an_empty_idempotency_key_is_refused(gateway: Start) -> None:  # noqa: F811
    client = gateway()
    for key in ("", "x" * 256):
        assert_problem(client.post("/v1/jobs", json={"seeds": [1]}, headers={"Idempotency-Key": key}), 422,
                       "Idempotency-Key")
    assert client.post("/v1/jobs", json={"seeds": [1]}, headers={"Idempotency-Key": "k-1"}).status_code == 202


def test_path_parameters_have_one_form(gateway: Start) -> None:  # noqa: F811
    client = gateway()
    job_id = client.post("/v1/jobs", json={"seeds": [1, 2]}).json()["id"]
    assert_problem(client.get(f"/v1/jobs/{job_id}/images/0.png"), 409)  # queued: the canonical index gets that far
    for index in ("1_0", "+1", "01", "-0", "1.0", "١", "9" * 12):
        assert_problem(client.get(f"/v1/jobs/{job_id}/images/{index}.png"), 422, "index")
    for other in ("abc", job_id + "x", job_id[:-1] + "=", "x" * LONG):
        response = client.get(f"/v1/jobs/{other}")
        assert_problem(response, 404)
        assert len(response.content) < 2000
        assert_problem(client.post(f"/v1/jobs/{other}/cancel"), 404)
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
