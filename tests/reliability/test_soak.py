"""The reliability soak of bench/soak.py, shortened: one stack (durable Redis, a gateway, two workers on
the bundled model, real processes on loopback), 32 clients with mixed settings and, one phase per
test, a worker's SIGKILL, a worker's SIGTERM, Redis's SIGKILL and restart, the gateway's restart.

Each phase must accept work, before and after its fault, and lose none of it: every job id a client
was given ends succeeded (its images fetched, valid PNGs) or failed with a reason; none is cancelled
(no client cancels), and no request that carried an Idempotency-Key made a second job.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.soak import FAULTS, HEAD, Options, Soak, notes, row

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 6 s of load per phase (the fault at 3 s), 1 s to settle: about 20 s a phase on two cores.
OPTIONS = Options(phase_s=6.0, settle_s=1.0, final_timeout_s=90.0, give_up_s=30.0)


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Soak]:
    soak = Soak(OPTIONS, tmp_path_factory.mktemp("soak"))
    try:
        soak.start()
        yield soak
    finally:
        soak.close()


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_under_load_loses_no_accepted_job(soak: Soak, fault: str, capsys: pytest.CaptureFixture[str]) -> None:
    phase = soak.phase(fault)
    with capsys.disabled():
        print("\n" + "\n".join([HEAD, row(phase), *notes(phase)]))
    logs = f"{phase}\n{soak.stack.log_tails()}"
    assert phase["accepted"] > 0 and phase["accepted_after_fault"] > 0, logs
    assert phase["lost"] == 0, logs
    assert phase["failed_without_reason"] == 0, logs
    assert phase["succeeded"] + phase["failed"] == phase["accepted"], logs  # none cancelled
    assert phase["orphans"].get("keyed duplicate", 0) == 0, logs
    assert phase["bad_sync_pngs"] == 0, logs
    if fault.startswith("worker-"):
        assert phase["timeline"]["jobs_held"] > 0, logs  # the fault hit a worker with work
    if fault == "worker-term":
        assert phase["timeline"]["exit_code"] == 0, logs  # drained, then a clean exit
