"""The playground page in headless Chromium, against a real gateway, worker and Redis."""

from __future__ import annotations

import base64
import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.ui.conftest import KEYS, UIStack, Watched, open_page, save_shot

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "edm-digits-8x8-cond"
HEUN_NFE = {6: 11}


def fill(page: Any, values: dict[str, str]) -> None:
    """Type into the form's fields by id (selects are chosen by value)."""
    for field_id, value in values.items():
        locator = page.locator(f"#{field_id}")
        if field_id[:2] in ("a-", "b-") and field_id[2:] != "preset" and not locator.is_visible():
            page.click(f"#{field_id[0]}-details > summary")  # "All sampler settings"
        if locator.evaluate("el => el.tagName") == "SELECT":
            locator.select_option(value)
        else:
            locator.fill(value)


def api_pngs(stack: UIStack, body: dict[str, Any]) -> list[bytes]:
    with stack.client() as client:
        response = client.post("/v1/generate", json=body, headers={"Accept": "application/json"})
    assert response.status_code == 200, response.text
    return [base64.b64decode(image["png_base64"]) for image in response.json()["images"]]


def zipped_pngs(page: Any, side: str) -> list[bytes]:
    """The run's "Download all (.zip)": the PNGs in seed order, read back with zipfile (which checks CRCs)."""
    with page.expect_download() as info:
        page.locator(f'.run[data-side="{side}"] button.download-all').click()
    data = Path(info.value.path()).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return [archive.read(name) for name in archive.namelist()]


def wait_status(page: Any, side: str, status: str, timeout_s: float = 90) -> None:
    page.wait_for_selector(f'.run[data-side="{side}"][data-status="{status}"]', timeout=timeout_s * 1000)


def sent_bodies(ui: Watched) -> list[dict[str, Any]]:
    return [json.loads(data) for url, data in ui.posts if "/ui/jobs" in url]


def job_id(page: Any, side: str) -> str:
    return page.locator(f'.run[data-side="{side}"]').get_attribute("data-job-id")


def test_page_loads_same_origin_with_strict_csp(ui: Watched, ui_stack: UIStack) -> None:
    page = ui.page
    response = page.request.get(ui_stack.url + "/")
    csp = response.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    for path in ("/ui/app.js", "/ui/style.css"):
        assert page.request.get(ui_stack.url + path).headers["content-security-policy"] == csp
    for path in ("/ui/nothing.js", "/ui/..%2Froutes%2Fui.py", "/ui/%2E%2E%2F%2E%2E%2Fapp.py"):
        assert page.request.get(ui_stack.url + path).status == 404, path
    assert page.locator("#model option").first.get_attribute("value") == MODEL
    assert "549,025" in page.locator("#model-card").inner_text()
    assert page.locator("#class-names option").count() == 10
    assert ui.console == [], ui.console
    assert ui.requests and all(url.startswith(ui_stack.url + "/") for url in ui.requests), ui.requests
    # an inline script is refused by the page's policy
    page.evaluate("""() => { const s = document.createElement('script'); s.textContent = 'window.inlineRan = 1';
                              document.body.append(s); }""")
    assert page.evaluate("() => window.inlineRan") is None
    # every control has a label; the sampler settings have a hint and a place for their error
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select')]
        .filter(el => !el.labels || el.labels.length === 0).map(el => el.id)""")
    assert unlabelled == []
    described = page.locator("#a-num_steps").get_attribute("aria-describedby")
    assert described == "a-num_steps-hint a-num_steps-error"
    # a phone-width window: nothing wider than the screen
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390


def test_generate_streams_every_evaluation_and_final_pngs_equal_the_api(ui: Watched, ui_stack: UIStack) -> None:
    page = ui.page
    fill(page, {"class_label": "7", "seeds": "0-1", "a-num_steps": "6"})
    page.click("#generate")
    wait_status(page, "a", "succeeded")
    expected = {"model": MODEL, "class_label": 7, "seeds": [0, 1], "num_steps": 6}
    assert sent_bodies(ui) == [expected]
    frames = [int(n) for n in page.locator('.run[data-side="a"] .cell').evaluate_all(
        "cells => cells.map(c => c.dataset.frames)")]
    assert frames == [HEUN_NFE[6]] * 2  # one x0 preview per network evaluation, for each image
    assert "NFE 11 / 11" in page.locator('.run[data-side="a"] .counters').inner_text()
    first_frame_ms = float(page.locator('.run[data-side="a"]').get_attribute("data-first-frame-ms"))
    print(f"first frame {first_frame_ms:.0f} ms after Generate")
    assert 0 < first_frame_ms < 30_000

    # once done, a slider steps through every evaluation's frames, then back to the final images
    page.focus("#scrub-a")
    page.keyboard.press("Home")
    assert page.locator("#scrub-a-value").inner_text().startswith("evaluation 1 of 11: step 1 / 6, σ = 80")
    assert page.locator(".cell img").first.get_attribute("src").startswith("data:image/png;base64,")
    page.keyboard.press("End")
    assert page.locator("#scrub-a-value").inner_text() == "final images"
    assert page.locator(".cell img").first.get_attribute("src").startswith("blob:")

    pngs = api_pngs(ui_stack, expected)
    assert zipped_pngs(page, "a") == pngs
    with page.expect_download() as info:
        page.locator('.run[data-side="a"] .cell a[download]').first.click()
    assert Path(info.value.path()).read_bytes() == pngs[0]
    assert info.value.suggested_filename.endswith("000000.png")

    page.locator('.run[data-side="a"] .cell button', has_text="Reproduce").nth(1).click()
    curl = page.locator("#reproduce-curl").inner_text()
    sent = re.search(r"-d '(.*)' -o", curl)
    assert sent is not None, curl
    body = json.loads(sent.group(1))
    assert body == {**expected, "seeds": [1]} and ui_stack.url + "/v1/generate" in curl
    cli = page.locator("#reproduce-cli").inner_text()
    assert cli.startswith("edm-serve sample --model model/bundled/edm-digits-8x8-cond.json --seeds 1 --class 7")
    assert "--steps 6" in cli and "--device cpu" in cli
    assert api_pngs(ui_stack, body) == [pngs[1]]

    page.reload()  # the history survives a reload
    page.wait_for_selector("body[data-ready]")
    assert "seeds 0-1" in page.locator("#history-list li").first.inner_text()
    assert ui.console == [], ui.console


def test_compare_two_samplers_on_the_same_seeds(ui: Watched, ui_stack: UIStack) -> None:
    page = ui.page
    page.check("#compare")
    # the paper's point at equal cost: EDM (Heun, 18 steps) vs the original VE sampler, both 35 NFE
    fill(page, {"class_label": "3", "seeds": "0-3", "a-preset": "edm", "b-preset": "ve"})
    page.click("#generate")
    wait_status(page, "a", "succeeded")
    wait_status(page, "b", "succeeded")
    a, b = sent_bodies(ui)
    assert a == {"model": MODEL, "class_label": 3, "seeds": [0, 1, 2, 3]}
    assert b == {**a, "num_steps": 35, "solver": "euler", "discretization": "ve", "schedule": "ve", "scaling": "none"}
    for side in ("a", "b"):
        timing = page.locator(f'.run[data-side="{side}"] .timing').inner_text()
        assert "NFE 35 / 35 per image" in timing and "wall" in timing and "sampling" in timing
        frames = page.locator(f'.run[data-side="{side}"] .cell').evaluate_all("cs => cs.map(c => +c.dataset.frames)")
        assert frames == [35] * 4
    save_shot(ui_stack, page, "playground-compare.png", full_page=False)
    assert zipped_pngs(page, "a") == api_pngs(ui_stack, a)
    assert zipped_pngs(page, "b") == api_pngs(ui_stack, b)
    assert ui.console == [], ui.console


def test_cancel_stops_a_running_job(ui: Watched, ui_stack: UIStack) -> None:
    page = ui.page
    fill(page, {"class_label": "5", "seeds": "0-3", "a-preset": "edm-stochastic"})
    page.click("#generate")
    # mid-generation: a good part of the 511 evaluations done
    page.wait_for_function("() => { const p = document.querySelector('.run progress'); "
                           "return p && p.value >= 200; }", timeout=90_000)
    save_shot(ui_stack, page, "playground-live.png", full_page=False)
    page.click("#cancel")
    wait_status(page, "a", "cancelled")
    with ui_stack.client() as client:
        view = client.get(f"/v1/jobs/{job_id(page, 'a')}").json()
    assert view["status"] == "cancelled"
    assert view["progress"]["nfe"] < view["progress"]["nfe_total"]
    assert page.locator("#cancel").is_disabled()


def test_a_422_is_shown_beside_the_field_it_names(ui: Watched, ui_stack: UIStack) -> None:
    page = ui.page
    fill(page, {"seeds": "0", "a-sigma_min": "5", "a-sigma_max": "1"})
    page.click("#generate")
    error = page.locator("#a-sigma_min-error")
    error.wait_for(state="visible")
    with ui_stack.client() as client:
        problem = client.post("/v1/jobs", json={"model": MODEL, "seeds": [0], "sigma_min": 5, "sigma_max": 1}).json()
    assert problem["field"] == "sigma_min"
    assert problem["detail"] in error.inner_text()
    assert page.locator("#a-sigma_min").get_attribute("aria-invalid") == "true"
    assert page.locator(".run").count() == 0

    fill(page, {"a-sigma_min": "", "a-sigma_max": "", "class_label": "eleven"})
    page.click("#generate")
    page.wait_for_function("() => document.querySelector('#class_label-error').textContent.includes('unknown class')")
    assert page.locator("#a-sigma_min-error").inner_text() == ""
    assert page.locator(".run").count() == 0


@pytest.fixture()
def keyed(browser: Any, ui_stack: UIStack) -> Iterator[Watched]:
    yield from open_page(browser, ui_stack.keyed_url + "/")


def test_api_keys_wrong_key_and_another_keys_job(keyed: Watched, ui_stack: UIStack) -> None:
    page = keyed.page
    page.locator("#auth").wait_for(state="visible")
    page.fill("#auth-key", "not-a-key")
    page.click("#auth-submit")
    page.wait_for_function("() => document.querySelector('#auth-error').textContent.includes('401')")
    assert "unknown API key" in page.locator("#auth-error").inner_text()

    page.fill("#auth-key", KEYS[0])
    page.click("#auth-submit")
    page.locator("#auth").wait_for(state="hidden")
    page.wait_for_selector("#model option", state="attached")
    assert page.evaluate("() => [sessionStorage.length, localStorage.length]") == [1, 0]

    with ui_stack.client(ui_stack.keyed_url, KEYS[1]) as other, ui_stack.client(ui_stack.keyed_url, KEYS[0]) as mine:
        theirs = other.post("/v1/jobs", json={"seeds": [0], "num_steps": 2}).json()["id"]
        ours = mine.post("/v1/jobs", json={"seeds": [0], "num_steps": 2}).json()["id"]
    page.fill("#job_id", theirs)
    page.click("#open-job")
    page.wait_for_function("() => document.querySelector('#job_id-error').textContent.includes('404')")
    assert page.locator(".run").count() == 0
    page.fill("#job_id", ours)
    page.click("#open-job")
    wait_status(page, "a", "succeeded")
    page.locator(".cell button", has_text="Reproduce").click()  # its settings come from the PNG's metadata
    curl = page.locator("#reproduce-curl").inner_text()
    assert '"num_steps":2' in curl and '"seeds":[0]' in curl and 'Authorization: Bearer $EDM_API_KEY' in curl
    assert "--steps 2" in page.locator("#reproduce-cli").inner_text()

    fresh = keyed.new_tab()  # a new tab has no session key: it asks again
    fresh.goto(ui_stack.keyed_url + "/")
    fresh.locator("#auth").wait_for(state="visible")
    fresh.fill("#auth-key", KEYS[0])
    fresh.check("#auth-remember")
    fresh.click("#auth-submit")
    fresh.locator("#auth").wait_for(state="hidden")
    remembered = keyed.new_tab()  # ...unless the key was remembered
    remembered.goto(ui_stack.keyed_url + "/")
    remembered.wait_for_selector("body[data-ready]")
    assert remembered.locator("#auth").is_hidden()
    assert remembered.locator("#model option").count() == 1
    # the browser logs the refused key (401) and the other key's job (404); nothing else
    assert [c for c in keyed.console if "status of 401" not in c and "status of 404" not in c] == []


def test_keyboard_only_generate_and_cancel(ui: Watched) -> None:
    page = ui.page

    def tab_to(element_id: str, limit: int = 120) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.id") == element_id:
                return
        raise AssertionError(f"Tab never reached #{element_id}")

    tab_to("seeds")
    page.keyboard.press("Control+A")
    page.keyboard.type("0-1")
    tab_to("a-preset")
    page.keyboard.press("ArrowDown")  # EDM deterministic -> EDM stochastic (256 steps)
    assert page.locator("#a-num_steps").input_value() == "256"
    tab_to("generate")
    page.keyboard.press("Enter")
    wait_status(page, "a", "running")
    page.wait_for_function("() => +document.querySelector('.cell').dataset.frames > 2")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.id") == "cancel"
    page.keyboard.press("Enter")
    wait_status(page, "a", "cancelled")
    assert ui.console == [], ui.console
