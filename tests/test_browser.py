"""The HTML report and TensorBoard's dashboards in a real browser: Debian's headless Chromium
(``apt-get install chromium``) driven by Playwright (``playwright`` from PyPI, which drives
a system Chromium through ``executable_path``; its own browser downloads are not used).

Screenshots land in each test's temporary directory (``report.png``,
``tensorboard_custom_scalars.png``, ``tensorboard_images.png``). Without Chromium or
Playwright the tests skip and say how to install them; CI installs both (``.ci/run``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from mtrl_ntk.envs import BENCHMARK_TASKS
from mtrl_ntk.report import generate_report
from mtrl_ntk.tb_layout import affinity_image
from tests.test_report import write_run

REPOSITORY = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# A quiet, offline, throw-away browser: no sandbox (CI runs as root), no GPU, no
# background traffic (updates, sync, QUIC), a fresh profile per session.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
MT10 = BENCHMARK_TASKS["mt10"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """A Chromium context (Playwright) with a fresh user-data directory."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium (CI does, in .ci/run)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (the test extra)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def opened(browser, url: str) -> Iterator[tuple[object, list[str]]]:
    """A new page at ``url`` and the console errors and uncaught exceptions it reports."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda message: errors.append(message.text)
            if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
    try:
        page.goto(url)
        yield page, errors
    finally:
        page.close()


def test_report_page_shows_its_tables_and_every_figure_without_console_errors(
    browser, tmp_path: Path
) -> None:
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root / f"ls{seed}", "ls", "mtsac", seed, 4, True)
        write_run(root / f"ntk{seed}", "ntkmtl", "mtsac", seed, 4, True, ntk=True)
    report = generate_report(root, tmp_path / "report", bootstrap_samples=200)
    figures = [path for path in report.files if path.suffix == ".png"]
    assert len(figures) == 7

    page_url = (tmp_path / "report" / "report.html").as_uri()
    with opened(browser, page_url) as (page, errors):
        page.wait_for_load_state("load")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        tables = page.locator("table")
        headers = tables.nth(0).locator("th").all_inner_texts()
        assert headers[:3] == ["Rank", "Method (combiner / arch)", "Seeds"]
        assert "Published Table 4 (Meta-World v1)" in headers
        main_rows = tables.nth(0).locator("tbody tr").all_inner_texts()
        assert len(main_rows) == 2 and any("ntkmtl / mtsac" in row for row in main_rows)
        rliable = page.locator("#rliable + div table")
        assert "IQM [95% CI]" in rliable.locator("th").all_inner_texts()
        assert rliable.locator("tbody tr").count() == 2
        assert page.get_by_text("P(ntkmtl / mtsac > Y) [95% CI]").count() == 1
        images = page.locator("img").evaluate_all(
            "images => images.map(image => ({alt: image.alt, complete: image.complete, "
            "width: image.naturalWidth, height: image.naturalHeight, "
            "shown: image.getBoundingClientRect().width}))"
        )
        assert len(images) == len(figures)
        for image in images:
            assert image["complete"] and image["width"] > 200 and image["height"] > 200, image
            assert image["shown"] > 200, image
        assert errors == []


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real smoke run (ntkmtl, 100 steps: one evaluation, affinity images at step 100)."""
    run_dir = tmp_path_factory.mktemp("smoke") / "ntkmtl"
    completed = subprocess.run(
        [sys.executable, "run_mt10.py", "experiment=smoke", "combiner=ntkmtl",
         "train.num_steps=100", "train.progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=300, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def tensorboard(smoke_run: Path) -> Iterator[str]:
    """A real TensorBoard server on a free localhost port, reading the smoke run's tb/."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(smoke_run), "--host",
         "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "TensorBoard did not answer in 120 s"
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def blob_key_tag(src: str) -> str:
    """The tag in an image URL of TensorBoard's images plugin (``blob_key``: base64url of
    the JSON list [experiment, run, tag, step, index])."""
    key = parse_qs(urlparse(src).query)["blob_key"][0]
    return json.loads(base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)))[2]


@pytest.mark.slow
def test_tensorboard_lists_per_task_success_charts_and_labelled_affinity_images(
    browser, tensorboard: str, tmp_path: Path
) -> None:
    with opened(browser, f"{tensorboard}/#custom_scalars") as (page, _):
        page.get_by_text("Success by task (eval, train)").first.wait_for(timeout=60_000)
        for task in MT10:  # one chart per task, titled with its name
            page.get_by_text(task, exact=True).first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "tensorboard_custom_scalars.png"), timeout=90_000)

    # The labelled image (task names on both axes, colour bar) is far larger than the
    # bare 16-pixel cells (160 x 160 for ten tasks).
    _, height, width = affinity_image(torch.eye(len(MT10)), MT10).shape
    with opened(browser, f"{tensorboard}/#images") as (page, _):
        page.get_by_text("combiner/critic/affinity").first.wait_for(timeout=60_000)
        page.get_by_text("Show actual image size").first.click()
        images = page.locator("img[src*='individualImage']")
        images.first.wait_for(timeout=60_000)
        shown = images.evaluate_all(
            "images => images.map(image => [image.complete, image.naturalWidth, "
            "image.naturalHeight, image.src])"
        )
        page.screenshot(path=str(tmp_path / "tensorboard_images.png"), timeout=90_000)
    tags = {blob_key_tag(src) for _, _, _, src in shown}
    assert tags == {"combiner/critic/affinity", "combiner/actor/affinity"}
    for complete, natural_width, natural_height, _ in shown:
        assert complete and (natural_width, natural_height) == (width, height)
