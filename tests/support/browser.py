"""Open a local HTML file in headless Chromium (Debian's ``chromium``) through Playwright.

Records what a careful reviewer would look for: console errors, uncaught exceptions,
dialogs (an ``alert`` that escaped from the data) and any request that is not the file
itself or an inline ``data:`` URI (the page must work offline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# The flags a root user in a closed network needs; Playwright adds --headless itself.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_binary() -> str | None:
    return (
        os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )


def browser_available() -> bool:
    return chromium_binary() is not None and importlib.util.find_spec("playwright") is not None


def chromium_or_skip() -> str:
    """The Chromium binary, or skip saying how to install it."""
    binary = chromium_binary()
    if not binary:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium; .ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="playwright comes with the dev extras")
    return binary


@dataclass
class Visit:
    page: object
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    outside_requests: list[str] = field(default_factory=list)


@contextlib.contextmanager
def open_page(html: Path, profile: Path) -> Iterator[Visit]:
    """``html`` loaded from disk in a fresh Chromium profile at ``profile``."""
    binary = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=binary,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            visit = Visit(page)
            page.on(
                "console",
                lambda m: visit.console_errors.append(m.text) if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: visit.page_errors.append(str(e)))

            def on_dialog(dialog) -> None:
                visit.dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(("file:", "data:"))
                    else visit.outside_requests.append(r.url)
                ),
            )
            page.goto(html.resolve().as_uri(), wait_until="load")
            yield visit
        finally:
            context.close()


# The run report's sections, in page order.
SECTIONS = [
    "Data",
    "Split",
    "Data issues",
    "Since the champion",
    "Training",
    "Results",
    "Export",
    "Provenance",
]


def section_headings(page) -> list[str]:
    return page.locator("main > section > h2").all_inner_texts()
