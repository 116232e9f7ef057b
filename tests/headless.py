"""Headless Chromium (the Debian package) for tests of HTML pages: the network is off
(a private network namespace where `unshare -n` is allowed, plus a dead proxy and a
resolver that finds nothing), a fresh profile per run. Skips with the install command
where Chromium is missing; .ci/run installs it when it can."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium; .ci/run installs it when it can)")
    return found


def browse(page: Path, query: str, tmp_path: Path, *extra: str) -> str:
    """Run headless Chromium on ``page?query`` with the network off; returns stdout."""
    offline = ["unshare", "-n"] if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"
    profile.mkdir()
    cmd = [*offline, chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
           "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND", "--hide-scrollbars", *extra,
           f"{page.resolve().as_uri()}{query}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def body_attrs(dom: str) -> dict[str, str]:
    return dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
