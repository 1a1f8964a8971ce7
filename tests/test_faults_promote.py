"""Promotion faults (#36): a promoter killed (SIGKILL) at random moments, two promoters at
once, a registry that is down, and a service reading production while it moves.

What is checked after each fault is what a consumer would trust: the ``production`` alias
must parse, point at a version whose ``version.json`` exists, and whose files read back
with the sha256s it records; ``resolve`` (what ``predict --model production`` and
``FollowedModel`` call) must give that file. The models are small real ONNX classifiers
(tests/support/models.py) padded to 4 MB, so a write takes long enough to be cut.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.registry.store import Registry, parse_ref, resolve, sha256_of
from pipeline.serving.followed import FollowedModel
from pipeline.serving.predict import OnnxClassifier
from tests.support.faults import SEED, record, run_trials, trials
from tests.support.models import colour_model
from tests.support.project import REPO_ROOT
from tests.support.s3 import s3_server
from tests.support.world import TinyWorld

pytestmark = pytest.mark.faults

# A promoter's registry work, looped: claim a version, upload its files, write its record,
# read it back, move production; under the registry's lock, as the promote stage does.
PROMOTER = """
import sys
from pathlib import Path
from pipeline.registry.store import Registry
url, lease, images, *models = sys.argv[1:]
registry = Registry(url, "classifier")
print("ready", flush=True)
n = 0
while True:
    files = {"model.onnx": Path(models[n % len(models)]), "images.parquet": Path(images)}
    with registry.locked(60, float(lease)):
        version, _ = registry.register(files, {"decision": "promoted"})
        registry.set_alias(version, "crash test")
    n += 1
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def padded_models(folder: Path, count: int = 3) -> list[Path]:
    return [
        colour_model(folder / f"model{i}.onnx", pad_bytes=4 << 20, seed=i) for i in range(count)
    ]


def consistent(url: str, cache: Path) -> str:
    """Production as a consumer finds it: verified, resolvable. Raises when it is not;
    returns where the kill left the registry (for the record)."""
    registry = Registry(url, "classifier")
    alias = registry.alias()
    taken = registry.versions()
    latest = taken[-1] if taken else None
    if alias is None:
        return "before the first alias"
    record_ = registry.verify(alias.version)
    assert record_["files"]["model.onnx"]["sha256"] == alias.sha256
    resolved = resolve(parse_ref(f"{url}#classifier"), cache)
    assert sha256_of(resolved.path) == alias.sha256 and resolved.version == alias.version
    OnnxClassifier(resolved.path)  # loads: a whole model
    if registry.version(latest) is None:
        return "the newest version claimed or being written"
    if alias.version != latest:
        return "the newest version complete, production not yet moved"
    return "production moved to the newest version"


def crash_trials(
    where: str, base: str, tmp: Path, count: int, lease_s: float, child_env: dict, remove
) -> list[str]:
    """``count`` kills of the looping promoter, each on a registry of its own under
    ``base`` (``remove(url)`` deletes it afterwards: a trial registers a 4 MB version
    every few tens of milliseconds)."""
    models = padded_models(tmp / "models")
    images = tmp / "images.parquet"
    images.write_bytes(os.urandom(1024))
    rng = random.Random(SEED)
    cases = [round(rng.uniform(0.0, 1.5), 3) for _ in range(count)]
    states: dict[str, int] = {}
    numbers = itertools.count()

    def trial(delay: float) -> None:
        url = f"{base}/{next(numbers)}"
        try:
            killed_promoter(url, delay)
        finally:
            remove(url)

    def killed_promoter(url: str, delay: float) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", PROMOTER, url, str(lease_s), str(images), *map(str, models)],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = consistent(url, tmp / "cache")
        states[state] = states.get(state, 0) + 1
        # The lock does not outlive its holder for long: the next promoter gets through.
        registry = Registry(url, "classifier")
        before = registry.alias()
        with registry.locked(lease_s * 3 + 10, lease_s):
            version, _ = registry.register(
                {"model.onnx": models[0], "images.parquet": images}, {"decision": "promoted"}
            )
            assert registry.set_alias(version, "after the crash").version == version
        after = registry.alias()
        assert before is None or after.history[-1]["version"] == before.version
        consistent(url, tmp / "cache")
        if url.startswith("s3://"):  # the lock object is gone once released
            assert registry.store.read("classifier/lock") is None

    failures = run_trials(f"promotion: SIGKILL of a promoter ({where})", cases, trial)
    print(f"where the kills left the registry: {states}")  # noqa: T201
    return failures


@pytest.mark.slow
def test_a_killed_promoter_never_leaves_production_on_a_partial_file(tmp_path):
    failures = crash_trials(
        "folder",
        str(tmp_path / "registries"),
        tmp_path,
        trials(200, 20),
        lease_s=5,
        child_env=env(),
        remove=lambda url: shutil.rmtree(url, ignore_errors=True),
    )
    assert failures == []


@pytest.mark.slow
def test_a_killed_promoter_on_s3_never_leaves_production_on_a_partial_file(tmp_path, monkeypatch):
    with s3_server(tmp_path) as s3:
        s3_env = {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}
        for key, value in s3_env.items():
            monkeypatch.setenv(key, value)
        client = s3.client()

        def remove(url: str) -> None:
            prefix = url.removeprefix(f"s3://{s3.bucket}/") + "/"
            for key in [k for k in s3.keys() if k.startswith(prefix)]:
                client.delete_object(Bucket=s3.bucket, Key=key)

        # The S3 lock is a lease: a killed holder's lock frees itself after 2 s here.
        failures = crash_trials(
            "S3",
            f"s3://{s3.bucket}/registries",
            tmp_path,
            trials(30, 4),
            2,
            {**env(), **s3_env},
            remove,
        )
        assert failures == []


@pytest.fixture
def world(tmp_path, monkeypatch) -> TinyWorld:
    return TinyWorld.for_promotion(tmp_path, monkeypatch)


def promote_command(workspace: Path, extra_env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "promote"],
        cwd=workspace,
        env={**env(), **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_the_promote_stage_killed_anywhere_leaves_production_whole(world, tmp_path):
    """The stage itself (``python -m pipeline promote``) killed at a random moment of its
    run, from start-up to its last write; then run again to the end."""
    world.write_params_file()
    colour_model(world().paths.onnx, pad_bytes=4 << 20)
    url = world().promote.registry
    started = time.monotonic()
    assert promote_command(world.root).wait(timeout=300) == 0  # version 1, production
    whole = time.monotonic() - started
    rng = random.Random(SEED)
    cases = [round(rng.uniform(0, whole), 2) for _ in range(trials(30, 3))]

    def trial(delay: float) -> None:
        colour_model(world().paths.onnx, pad_bytes=4 << 20, seed=int(delay * 100))
        run = promote_command(world.root)
        time.sleep(delay)
        run.send_signal(signal.SIGKILL)
        run.wait()
        consistent(url, tmp_path / "cache")
        again = promote_command(world.root)
        assert again.wait(timeout=300) == 0, again.stdout.read()
        consistent(url, tmp_path / "cache")
        assert Registry(url, "classifier").alias().version == max(
            Registry(url, "classifier").versions()
        )

    failures = run_trials("promotion: SIGKILL of the promote stage, then rerun", cases, trial)
    assert failures == []


@pytest.mark.slow
def test_two_promoters_at_once_take_turns(world, tmp_path):
    """Two ``python -m pipeline promote`` in two workspaces on one registry, started
    together: both register a version, each numbered once; the second to hold the lock
    compares against what the first left in production."""
    world.write_params_file()
    colour_model(world().paths.onnx)
    other = tmp_path / "ws2"
    shutil.copytree(world.root, other)
    registry = Registry(world().promote.registry, "classifier")

    def trial(n: int) -> None:
        colour_model(world.root / "models/model.onnx", seed=2 * n)
        colour_model(other / "models/model.onnx", seed=2 * n + 1)
        before = registry.versions()
        # Both score before either may write: the lock is held here until both wait for it.
        with registry.locked(60, 5):
            runs = [promote_command(world.root), promote_command(other)]
            heads = [waited_for_lock(run) for run in runs]
        logs = [
            head + run.communicate(timeout=300)[0] for head, run in zip(heads, runs, strict=True)
        ]
        assert [run.returncode for run in runs] == [0, 0], logs
        # The second to hold the lock found production moved, and scored again.
        assert sum("scoring again" in log for log in logs) == 1, logs
        new = [v for v in registry.versions() if v not in before]
        assert len(new) == 2, new
        first, second = (registry.version(v) for v in new)
        assert second["champion_version"] == first["version"]
        assert first["decision"] in ("first", "promoted") and second["decision"] == "promoted"
        production = registry.alias()
        assert production.version == second["version"]
        assert production.history[-1]["version"] == first["version"]
        metrics = [
            json.loads((ws / "metrics/promote.json").read_text()) for ws in (world.root, other)
        ]
        assert sorted(m["version"] for m in metrics) == new
        consistent(registry.url, tmp_path / "cache")

    failures = run_trials("promotion: two promoters at once", list(range(trials(10, 2))), trial)
    assert failures == []


def waited_for_lock(run: subprocess.Popen) -> str:
    """What ``run`` logged up to the line saying it waits for the registry's lock."""
    lines = []
    while line := run.stdout.readline():
        lines.append(line)
        if "waiting for" in line and "lock" in line:
            break
    return "".join(lines)


def test_a_registry_that_is_down_fails_promote_naming_it(world, tmp_path):
    """Down (nothing listens) or refusing (wrong credentials): promote exits 1 with one
    error line naming the registry URL; production on the real registry stays."""
    with s3_server(tmp_path) as s3:
        url = f"s3://{s3.bucket}/registry"
        good = {**s3.env(), "AWS_ENDPOINT_URL": s3.endpoint}
        world.write_params_file(promote={"registry": url})
        colour_model(world().paths.onnx)
        done = promote_command(world.root, good)
        assert done.wait(timeout=120) == 0, done.stdout.read()
        colour_model(world().paths.onnx, seed=1)
        cases = {
            "nothing listening": {**good, "AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
            "credentials refused": {**good, "AWS_SECRET_ACCESS_KEY": "wrong"},
        }
        registry_before = set(s3.keys())

        def trial(case: str) -> None:
            run = promote_command(world.root, cases[case])
            output = run.communicate(timeout=120)[0]
            assert run.returncode == 1, output
            errors = [line for line in output.splitlines() if " ERROR " in line]
            assert len(errors) == 1 and f"registry {url}" in errors[0], output
            assert set(s3.keys()) == registry_before  # nothing written, production as it was

        failures = run_trials("promotion: the registry down or refusing", list(cases), trial)
        assert failures == []
        with pytest.MonkeyPatch.context() as monkeypatch:
            for key, value in good.items():
                monkeypatch.setenv(key, value)
            assert Registry(url, "classifier").alias().version == 1


def test_a_reader_during_many_swaps_always_gets_one_whole_verified_version(tmp_path):
    """A service (FollowedModel, polling as fast as it can, with two request threads)
    while another process moves production among three versions: every answer is exactly
    what the version it names computes, and the alias never reads as partial."""
    url = str(tmp_path / "registry")
    registry = Registry(url, "classifier")
    images = tmp_path / "images.parquet"
    images.write_bytes(b"x")
    models = [colour_model(tmp_path / f"m{v}.onnx", scale=float(v)) for v in (1, 2, 3)]
    with registry.locked(10, 5):
        for model in models:
            version, _ = registry.register(
                {"model.onnx": model, "images.parquet": images}, {"decision": "promoted"}
            )
            registry.set_alias(version, "setup")
    batch = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    expected = {
        v: OnnxClassifier(m).probabilities(batch) for v, m in zip((1, 2, 3), models, strict=True)
    }
    swaps = trials(1000, 100)
    mover = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom pipeline.registry.store import Registry\n"
            "r = Registry(sys.argv[1], 'classifier')\n"
            "for i in range(int(sys.argv[2])):\n"
            "    with r.locked(10, 5):\n"
            "        r.set_alias(i % 3 + 1, 'swap')\n",
            url,
            str(swaps),
        ],
        env=env(),
    )
    followed = FollowedModel(f"{url}#classifier", cache=tmp_path / "cache")
    answers, wrong, seen = [0], [], set()
    done = threading.Event()

    def requests() -> None:
        while not done.is_set():
            version, probabilities = followed.probabilities(batch)
            answers[0] += 1
            seen.add(version)
            if not np.array_equal(probabilities, expected[version]):
                wrong.append(version)

    threads = [threading.Thread(target=requests) for _ in range(2)]
    for thread in threads:
        thread.start()
    moved = alias_errors = 0
    try:
        while mover.poll() is None:
            try:
                registry.alias()  # raises on a partial alias file
            except Exception:  # counted: there must be none
                alias_errors += 1
            moved += followed.refresh()
    finally:
        done.set()
        for thread in threads:
            thread.join()
    passed = swaps if not wrong and not alias_errors and mover.returncode == 0 else 0
    record(
        "promotion: a service reading while production moves",
        swaps,
        passed,
        len(wrong),
        answers=answers[0],
        reader_swaps=moved,
    )
    assert mover.returncode == 0 and alias_errors == 0 and wrong == []
    assert moved >= 3 and seen == {1, 2, 3}, (moved, seen)
