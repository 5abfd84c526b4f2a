"""The playground against real servers, in a real browser.

One Redis, one worker serving the bundled digits model, and two gateways on it: an open one and
one with API keys. The browser is Debian's Chromium (deploy/ci-install.sh installs it) driven by
Playwright for Python, which is pointed at that executable and never downloads a browser.
Screenshots go to a temporary folder, and also to $EDM_UI_SCREENSHOTS when set
(`EDM_UI_SCREENSHOTS=docs/images` refreshes the README's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.servers import ROOT, Process, RedisServer, spawn_worker, stack_env, start_gateway, wait_worker

KEYS = ("key-one", "key-two")
CHROMIUM = ("chromium", "chromium-browser")


@dataclass
class UIStack:
    url: str            # the open gateway
    keyed_url: str      # the gateway that needs one of KEYS
    logs: Path
    shots: Path
    processes: list[Process]

    def client(self, url: str | None = None, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=url or self.url, timeout=60, headers=headers)

    def output(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.output()[-3000:]}" for p in self.processes)


@pytest.fixture(scope="module")
def ui_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIStack]:
    logs = tmp_path_factory.mktemp("ui-logs")
    redis_server = RedisServer(tmp_path_factory.mktemp("ui-redis")).start()
    env = stack_env(redis_server.url, {}, EDM_BUNDLED_MODEL="true")
    processes: list[Process] = []
    try:
        worker = spawn_worker(env, logs / "worker.log")
        processes.append(worker)
        gateway, url = start_gateway(env, logs / "gateway.log")
        processes.append(gateway)
        keyed, keyed_url = start_gateway({**env, "EDM_API_KEYS": ",".join(KEYS)}, logs / "gateway-keyed.log")
        processes.append(keyed)
        conn = redis_server.client()
        wait_worker(worker, conn)
        conn.close()
        yield UIStack(url, keyed_url, logs, tmp_path_factory.mktemp("ui-shots"), processes)
    finally:
        for proc in reversed(processes):
            proc.stop()
        redis_server.stop()


def chromium_path() -> str:
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("no Chromium on PATH: deploy/ci-install.sh installs Debian's chromium (make test runs it)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_path(),
                                              args=["--disable-gpu", "--disable-dev-shm-usage"])
        yield instance
        instance.close()


@dataclass
class Watched:
    """A page with what it logged and every URL it asked for."""

    page: Any
    context: Any
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    posts: list[tuple[str, str]] = field(default_factory=list)

    def watch(self, page: Any) -> Any:
        page.set_default_timeout(60_000)
        page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}") if m.type in ("error", "warning")
                else None)
        page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        page.on("request", self._request)
        return page

    def _request(self, request: Any) -> None:
        self.requests.append(request.url)
        if request.method == "POST":
            self.posts.append((request.url, request.post_data or ""))

    def new_tab(self) -> Any:
        return self.watch(self.context.new_page())


def open_page(browser: Any, url: str, **context_options: Any) -> Iterator[Watched]:
    context = browser.new_context(accept_downloads=True, **context_options)
    watched = Watched(page=None, context=context)
    watched.page = watched.new_tab()
    watched.page.goto(url)
    try:
        yield watched
    finally:
        context.close()


@pytest.fixture()
def ui(browser: Any, ui_stack: UIStack) -> Iterator[Watched]:
    """The playground of the open gateway, loaded and ready, in a fresh browser context."""
    for watched in open_page(browser, ui_stack.url + "/", viewport={"width": 1280, "height": 900}):
        watched.page.wait_for_selector("body[data-ready]")
        yield watched


def save_shot(stack: UIStack, page: Any, name: str, **options: Any) -> Path:
    """A screenshot in the test's folder, copied to $EDM_UI_SCREENSHOTS when it is set."""
    path = stack.shots / name
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(path), **options)
    target = os.environ.get("EDM_UI_SCREENSHOTS")
    if target:
        folder = Path(target) if Path(target).is_absolute() else ROOT / target
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, folder / name)
    return path
