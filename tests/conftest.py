"""Fixtures: tiny generated image folders, a workspace to run stages in with params from
params.yaml plus overrides, and tiny workspaces after the data stages (tests/support/world.py)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from pipeline.config import Params
from tests.support import project
from tests.support.images import create_image_folder
from tests.support.prefect import prefect_server
from tests.support.project import params_with
from tests.support.world import TinyWorld

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def pytest_collection_modifyitems(config, items) -> None:
    """Longest work first, for ``make test``'s workers, which take work in this order: the
    modules marked ``one_worker`` (largest first), then the other slow tests, then the rest;
    each module's order is kept. A shuffled run (``-p randomly``) keeps its shuffle. Tests
    marked ``gpu`` skip, saying why, where torch sees no CUDA device."""

    def module(item) -> str:
        return item.nodeid.split("::", 1)[0]

    sizes = collections.Counter(module(item) for item in items)

    def rank(item) -> tuple[int, int]:
        if item.get_closest_marker("one_worker"):
            return 0, -sizes[module(item)]
        return (1 if item.get_closest_marker("slow") else 2), 0

    if not config.pluginmanager.has_plugin("randomly"):
        items.sort(key=rank)
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``make test``), tests go to workers one at a time, except that a
    module marked ``one_worker`` goes whole to one worker, so its module-scoped fixture is
    built once. (pytest 9.2's node ids defeat xdist's own ``xdist_group``.)"""
    from xdist.scheduler import LoadScopeScheduling

    root = Path(config.rootpath)
    whole: dict[str, bool] = {}

    def marked(module: str) -> bool:
        if module not in whole:
            path = root / module
            whole[module] = path.is_file() and "pytest.mark.one_worker" in path.read_text()
        return whole[module]

    class OneWorkerModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if marked(module) else nodeid

    return OneWorkerModules(config, log)


@pytest.fixture(scope="session", autouse=True)
def shared_graph_structures(tmp_path_factory):
    """One folder of kept graph structures for the session's copied projects
    (``project.copy_project``); under pytest-xdist, one for all its workers."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "structures"
    project.SHARED_STRUCTURES = folder
    yield folder
    project.SHARED_STRUCTURES = None


@pytest.fixture
def tiny_imagefolder(tmp_path: Path) -> Path:
    """Three classes of ten small distinct images, in ``tmp_path/images``."""
    return create_image_folder(tmp_path / "images", {"cat": 10, "dog": 10, "bird": 10})


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run stages inside ``tmp_path/ws`` (params use relative paths, like the repo); returns
    a function from section overrides to :class:`Params` (params.yaml plus the overrides)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)

    def make_params(**sections) -> Params:
        return params_with(**sections)

    return make_params


@pytest.fixture
def tiny_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> TinyWorld:
    """A workspace (the working directory) whose data stages have run on 3 classes x 10
    noise images, with random weights; call it with overrides for the next stages' params."""
    return TinyWorld.build(tmp_path, monkeypatch, images_per_class=10)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """One ``prefect server start`` on a free loopback port for the session's flow tests;
    yields the environment that reaches it."""
    with prefect_server(tmp_path_factory.mktemp("prefect")) as env:
        yield env


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    """Three classes of twelve noise images, for whole pipeline runs."""
    return create_image_folder(
        tmp_path_factory.mktemp("data") / "images", {"cat": 12, "dog": 12, "bird": 12}
    )
