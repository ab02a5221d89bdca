"""`sae-kit browse` end to end: the real Streamlit server on a real sweep (a copy with synthetic autointerp results),
driven by headless Chromium through Playwright."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sae_kit.dashboards.store import FeatureIndex

pytestmark = pytest.mark.slow
SAE_KIT = [sys.executable, "-m", "sae_kit.cli"]
MEMBER = "topk-k16-1152-s0"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
# Headless and quiet: the network is closed, and without these Chromium keeps dialling out (refused connections).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
]
VISIBLE = {" ": "·", "\n": "↵\n", "\t": "⇥", "\r": "␍"}  # how dashboards/render.py shows whitespace
WAIT_MS = 60_000
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def healthy(port: int) -> bool:
    try:
        with NO_PROXY.open(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as res:
            return res.status == 200
    except (OSError, http.client.HTTPException):
        return False


@contextmanager
def server(run: Path, port: int, log: Path) -> Iterator[subprocess.Popen]:
    """`sae-kit browse RUN --port PORT`, once its health check answers; stopped by its PID (it execs Streamlit in place)."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*SAE_KIT, "browse", str(run), "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 90
        while not healthy(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                state = f"exited with {proc.returncode}" if proc.returncode is not None else "still starting after 90 s"
                pytest.fail(
                    f"sae-kit browse never answered on port {port} ({state}); its output:\n{log.read_text()}",
                    pytrace=False,
                )
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:  # never signal a PID that was already reaped
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def shown(token: str) -> str:
    """A token's text as the page writes it: whitespace made visible (a newline still breaks the line), empty as ∅."""
    return "".join(VISIBLE.get(ch, ch) for ch in token) or "∅"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_feature_page(chromium: str, browse_run: Path, tmp_path: Path) -> None:
    """A deep link opens a firing feature's page with its explanation and detection score, and its top contexts
    highlighted as the index says; Next moves on."""
    from playwright.sync_api import expect, sync_playwright
    from test_browse_app import write_autointerp

    index = FeatureIndex(browse_run / MEMBER / "index")
    summary = index.summary.iloc[: index.d_sae - 1]  # not the last feature, so Next is enabled
    n = int(summary.loc[summary["max_act"].idxmax(), "feature"])
    top = index.feature(n)["top"][0]
    assert top["act"] > 0
    peak = shown(index.vocab[top["tokens"][top["peak"]]])
    run = tmp_path / "sweep"
    shutil.copytree(browse_run, run)
    explanation = "dates and days of the week"
    write_autointerp(run / MEMBER / "index", {n: explanation, n + 1: None}, {"detection": {n: 0.875}})
    port = free_port()
    shot = ARTIFACTS / "feature_page.png"
    ARTIFACTS.mkdir(exist_ok=True)
    shot.unlink(missing_ok=True)
    expect.set_options(timeout=WAIT_MS)

    with server(run, port, tmp_path / "server.log"), sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        page.goto(f"http://127.0.0.1:{port}/?page=Feature&feature={n}&sae={MEMBER}")
        expect(page.locator("h1")).to_have_text(f"Feature {n}")
        expect(page.get_by_text("Top activations")).to_be_visible()
        expect(page.get_by_text("Co-firing features")).to_be_visible()  # the last section: the page is complete
        expect(page.get_by_test_id("stStatusWidget")).to_have_count(0)  # and the script is done running
        expect(page.locator('[data-testid="stException"], [data-testid="stAlertContentError"]')).to_have_count(0)
        expect(page.get_by_test_id("stMarkdown").filter(has_text="Explanation:")).to_have_text(
            f"Explanation: {explanation}"
        )
        score = page.get_by_test_id("stMetric").filter(has_text="detection score")
        expect(score.get_by_test_id("stMetricValue")).to_have_text("0.875")
        expect(page.get_by_test_id("stMetric").filter(has_text="detection AUROC")).to_contain_text("0.895")

        first = page.locator(".sk-ctx").first
        assert peak in first.text_content()
        peak_el = first.locator(".sk-peak")
        expect(peak_el).to_have_count(1)
        assert peak_el.text_content() == peak
        assert first.locator(".sk-act").text_content() == f"{top['act']:+.2f}"
        style = peak_el.evaluate("e => { const s = getComputedStyle(e); return [s.backgroundColor, s.outlineStyle]; }")
        assert style[0] not in ("transparent", "rgba(0, 0, 0, 0)") and style[1] == "solid", (
            f"the peak token is not highlighted: {style}"
        )

        height = page.get_by_test_id("stMain").evaluate(
            "e => e.scrollHeight"
        )  # Streamlit scrolls inside stMain, not the page
        page.set_viewport_size({"width": 1400, "height": max(height, 1000)})
        page.screenshot(path=shot, full_page=True)

        page.get_by_role("button", name="Next ▶").click()
        expect(page.locator("h1")).to_have_text(f"Feature {n + 1}")
        expect(page).to_have_url(re.compile(rf"[?&]feature={n + 1}(&|$)"))
        expect(page.get_by_text("the explainer's answer could not be parsed")).to_be_visible()
        expect(page.get_by_text("Explanation:")).to_have_count(0)
        browser.close()

    assert not listening(port), f"port {port} still answers after sae-kit browse (PID) was stopped"
    width, height = png_size(shot)
    assert width >= 1000 and height >= 1000 and shot.stat().st_size > 50_000, (
        f"{shot} looks empty ({width}x{height}, {shot.stat().st_size} bytes)"
    )
