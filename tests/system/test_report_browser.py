"""report.html renders in a real browser with the network off: the page itself reports what it drew.

Headless Chromium opens the file from disk with every network path closed (proxy to a dead port, every host
unresolvable, background services off); the page's inline script sets ``data-rendered="ok"`` and counts
the epsilon series and client rows on ``<body>`` (and, when the run has sibling runs of its scenario, the
points of the accuracy-vs-epsilon curve and the width the browser laid it out at), and the dumped DOM is
checked. Installing Chromium (Debian package ``chromium``) is the CI script's job; without it this test is
skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from support import write_run

from fedllm.report.write import write_folder_reports, write_reports

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
TIMEOUT_S = 60


def _chromium() -> str:
    for name in CHROMIUM_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium not found (/usr/bin/chromium): install the Debian package 'chromium'")


def _run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium offline; on timeout its whole process group (renderers, zygote) is killed, not just the parent."""
    cmd = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--proxy-server=127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--virtual-time-budget=5000",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT_S}s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    run = write_run(tmp_path_factory.mktemp("browser") / "run", rounds=3, refuse_from={"beta": 3})
    return write_reports(run)["html"]


def test_page_renders_offline(report_html, tmp_path):
    binary = _chromium()
    proc = _run_chromium(binary, tmp_path / "profile", "--dump-dom", report_html.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs.get("rendered") == "ok", attrs
    assert attrs["series"] == "3"  # one epsilon series per client
    assert attrs["rows"] == "3"  # one table row per client


def test_screenshot(report_html, tmp_path):
    binary = _chromium()
    shot = tmp_path / "report.png"
    proc = _run_chromium(
        binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,1600", report_html.resolve().as_uri()
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert shot.is_file()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # charts and tables, not a blank page (a blank 1200x1600 page is about 9 kB)


def _body_attrs(binary: str, page: Path, profile: Path) -> dict[str, str]:
    proc = _run_chromium(binary, profile, "--dump-dom", page.resolve().as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:2000]
    return dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))


def test_curve_renders_offline(tmp_path_factory, tmp_path):
    """A run beside two others of its scenario: its page draws the accuracy-vs-epsilon curve (two private runs,
    the non-private one dashed), and so does the folder's comparison page."""
    binary = _chromium()
    folder = tmp_path_factory.mktemp("browser-curve")
    write_run(folder / "dp-3", rounds=3)
    write_run(folder / "dp-2", rounds=2)
    write_run(folder / "nodp", rounds=1, dp=False)
    pages = write_folder_reports(folder)
    run_page, folder_page = pages[1]["html"], pages[-1]["html"]
    assert run_page == folder / "dp-3" / "report.html" and folder_page == folder / "report.html"
    attrs = _body_attrs(binary, run_page, tmp_path / "profile")
    assert attrs.get("rendered") == "ok", attrs
    assert attrs["expect"].split() == ["epsilon-chart", "accuracy-chart", "clients-table", "curve-chart"]
    assert attrs["curve"] == "2" and int(attrs["curvewidth"]) > 100  # two points, laid out apart on the x axis
    assert attrs["series"] == "3" and attrs["rows"] == "3"
    attrs = _body_attrs(binary, folder_page, tmp_path / "profile")
    assert attrs.get("rendered") == "ok", attrs
    assert attrs["curve"] == "2" and int(attrs["curvewidth"]) > 100
