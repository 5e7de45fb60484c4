"""Notebook 02 in a real browser: JupyterLab on a free loopback port, headless Chromium (Debian's) driven by Playwright.

The test opens a copy of the notebook, runs every cell, and checks what a reader sees: the plan map and the Gantt
chart drawn by plotly, a readout whose predicted figures follow the edge-to-cloud bandwidth slider, the reason
shown (and the figures cleared) when the source's memory is too small, and a notebook that opening does not mark
modified. It skips, with the reason, where Chromium or Playwright is missing; it never downloads a browser.
Screenshots go to the test's temporary folder.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from edgeshard_kit.experiments.notebooks import ensure_kernel
from helpers import free_port

NB = Path(__file__).resolve().parents[1] / "notebooks" / "02_plan_interactive.ipynb"
CHROMIUM = "/usr/bin/chromium"  # Debian's package (`make sysdeps` installs it when root)
MS = 1000

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; `make sysdeps` does it as root)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright for Python is not installed (pip install -e '.[dev]')")
    return sync_playwright


@pytest.fixture
def sync_playwright():
    """Playwright's sync entry point; skips (with the reason) before anything starts when it cannot run."""
    return _playwright()


@pytest.fixture
def lab(tmp_path, sync_playwright):
    """(base URL, token, notebook folder): JupyterLab serving a copy of notebook 02, stopped afterwards."""
    root = tmp_path / "lab"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(NB, root / "notebooks" / NB.name)  # its results_root "../results" lands in tmp_path/lab/results
    ensure_kernel()  # the notebook's kernelspec, pointing at this interpreter
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "official Jupyter news?" toast over the notebook
    port, token = free_port(), secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=", f"--LabApp.workspaces_dir={tmp_path / 'ws'}",
           f"--LabApp.user_settings_dir={tmp_path / 'settings'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(tmp_path / 'lab.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield base, token, root / "notebooks"
    finally:
        proc.terminate()  # the server shuts its kernels down on SIGTERM
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # a kernel left behind in the server's session
        except ProcessLookupError:
            pass
        log.close()


def _text(page, selector: str) -> str:
    return page.locator(selector).first.inner_text(timeout=60 * MS)


def test_notebook_02_in_jupyterlab(sync_playwright, lab, tmp_path):
    base, token, _ = lab
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run as root inside its sandbox
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args, timeout=120 * MS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(180 * MS)
            page.goto(f"{base}/lab/tree/notebooks/{NB.name}?token={token}", timeout=180 * MS)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180 * MS)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                   " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                                   ".status === 'idle'", timeout=180 * MS)
            time.sleep(2)  # let the kernel's info settle into the notebook's metadata
            dirty = page.evaluate("() => window.jupyterapp.shell.currentWidget.context.model.dirty")
            assert not dirty, "opening the notebook (and starting its kernel) marked it modified"

            page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
            page.wait_for_selector(".edgeshard-readout .edgeshard-plan", timeout=300 * MS)
            page.wait_for_function("() => document.querySelectorAll('.edgeshard-figures .js-plotly-plot').length >= 3",
                                   timeout=180 * MS)
            titles = page.eval_on_selector_all(".edgeshard-figures .js-plotly-plot .gtitle",
                                               "els => els.map(e => e.textContent)")
            assert any("layer-to-device map" in t for t in titles), titles
            assert any("pipeline timeline" in t for t in titles), titles
            assert page.locator(".edgeshard-figures .js-plotly-plot .barlayer .point").count() > 0  # Gantt bars
            assert page.locator(".edgeshard-table table").count() == 1
            page.screenshot(path=str(tmp_path / "02_first_solve.png"), full_page=False)

            # the edge-to-cloud bandwidth: down to its lowest, the readout's predicted figures change
            before = _text(page, ".edgeshard-readout")
            handle = page.locator(".edgeshard-cloud .noUi-handle").first
            handle.focus()
            handle.press("Home")
            page.wait_for_function("(b) => document.querySelector('.edgeshard-readout').innerText !== b", arg=before,
                                   timeout=180 * MS)
            after = _text(page, ".edgeshard-readout")
            assert _text(page, ".edgeshard-cloud-mbps") == "0.1 Mbps"
            figures = lambda text: (text.split("predicted")[1].split("ms/token")[0],  # noqa: E731
                                    text.split("tokens/s")[0].split(",")[-1])
            assert figures(after) != figures(before), (before, after)
            page.screenshot(path=str(tmp_path / "02_cloud_slow.png"))

            # the source's memory too small: the reason, and no figures
            readout = page.locator(".edgeshard-memory .widget-readout").first
            readout.click()
            page.keyboard.press("Control+A")
            page.keyboard.type("0.1")
            page.keyboard.press("Enter")
            page.wait_for_selector(".edgeshard-readout .edgeshard-infeasible", timeout=180 * MS)
            reason = _text(page, ".edgeshard-readout")
            assert "No feasible plan" in reason and "infeasible" in reason and "source" in reason, reason
            assert page.locator(".edgeshard-figures .js-plotly-plot").count() == 0
            page.screenshot(path=str(tmp_path / "02_infeasible.png"))
        finally:
            browser.close()
