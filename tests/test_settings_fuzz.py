"""Settings that cannot be wrong (issue #37): every leaf key of params.yaml, given hostile
values of its own type and of others, either loads (the value is one the key accepts) or
fails with the config's one-line error naming that key: never another exception. And the
values the declared rules accept run the stage that reads them on tiny data without a
traceback (train_head's keys: the issue's table)."""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Annotated, Any, Literal, Union

import pytest
from annotated_types import Ge, Gt, Le, Lt, MinLen
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import HeadParams, declared_type, flat_rules, parse_params
from pipeline.errors import ConfigError, PipelineError
from pipeline.stages import features, train_head
from pipeline.system.settingsdoc import leaves
from tests.support.faults import record, trials
from tests.support.project import repo_params

pytestmark = pytest.mark.faults

SETTINGS = {"database": None, "deadline": None, "derandomize": True}


def with_value(base: dict, dotted: str, value: Any) -> dict:
    raw = copy.deepcopy(base)
    *parents, last = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    node[last] = value
    return raw


def accepted(tp: Any) -> st.SearchStrategy:
    """Values the declaration accepts (ints capped at 64 past their lower bound, so a run
    on tiny data ends: an accepted 10**18 epochs is valid and stops on patience, slowly)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        low = {type(r): r for r in flat_rules(rules)}
        if base is int:
            lo = low[Ge].ge if Ge in low else (low[Gt].gt + 1 if Gt in low else 0)
            hi = low[Le].le if Le in low else (low[Lt].lt - 1 if Lt in low else lo + 64)
            return st.integers(lo, min(hi, lo + 64))
        if base is float:
            lo = low[Ge].ge if Ge in low else (low[Gt].gt if Gt in low else -1e6)
            hi = low[Le].le if Le in low else (low[Lt].lt if Lt in low else 1e6)
            return st.floats(lo, hi, exclude_min=Gt in low, exclude_max=Lt in low, allow_nan=False)
        if base is str and MinLen in low:
            return st.text(min_size=1, max_size=8)
        return accepted(base)
    if origin in (Union, types.UnionType):
        return st.one_of([accepted(option) for option in typing.get_args(tp)])
    if origin is Literal:
        return st.sampled_from(typing.get_args(tp))
    if tp is type(None):
        return st.none()
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(-(2**31), 2**31)
    if tp is float:
        return st.floats(-1e6, 1e6, allow_nan=False)
    return st.text(max_size=8)


HOSTILE = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2**31,
            2**63,
            -(2**63),
            10**400,
            0.0,
            -0.0,
            1e-320,
            1e308,
            math.nan,
            math.inf,
            -math.inf,
            "",
            " ",
            "auto",
            "all",
            "null",
            "none",
            "nan",
            ".inf",
            "1e-3",
            "∞",
            "日本語",
            "\x00",
            [],
            [1],
            {},
            {"a": 1},
            None,
            True,
            False,
        ]
    ),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def names(message: str, dotted: str) -> bool:
    """Whether an error names ``dotted``, or the mapping it sits in where a rule spans it
    (``split.ratios`` must sum to 1; ``data.label_columns`` must name two columns)."""
    parent = dotted.rsplit(".", 1)[0]
    return dotted in message or (dotted.count(".") >= 2 and parent in message)


def sweep(dotted: str, values: st.SearchStrategy, examples: int, trial) -> None:
    """Run ``trial(value)`` on ``examples`` values hypothesis draws from ``values``."""

    @settings(max_examples=examples, suppress_health_check=list(HealthCheck), **SETTINGS)
    @given(value=values)
    def run(value):
        trial(dotted, value)

    run()


def test_every_key_loads_a_value_or_fails_naming_the_key_in_one_line():
    base = repo_params()
    keys = [dotted for dotted, _ in leaves(base)]
    tried, bad = [0], []

    def loads_or_names_the_key(dotted: str, value: Any) -> None:
        tried[0] += 1
        try:
            parse_params(with_value(base, dotted, value))
        except ConfigError as exc:
            message = str(exc)
            if "\n" in message or not names(message, dotted):
                bad.append(f"{dotted}={value!r}: {message}")
        except Exception as exc:  # noqa: BLE001 - what the test exists to catch
            bad.append(f"{dotted}={value!r}: {type(exc).__name__}: {exc}")

    for dotted in keys:
        values = st.one_of(HOSTILE, accepted(declared_type(dotted)))
        sweep(dotted, values, trials(400, 60), loads_or_names_the_key)
    record(
        "settings: hostile values for every params.yaml key (load or a one-line error naming it)",
        tried[0],
        tried[0] - len(bad),
        keys=len(keys),
    )
    assert len(keys) > 100
    assert bad == []


HEAD_KEYS = [f"head.{field.name}" for field in dataclasses.fields(HeadParams)]


@pytest.mark.slow
def test_every_value_train_heads_rules_accept_trains_without_a_traceback(tiny_run):
    """Property two on the issue's keys: an accepted value runs train_head to a model, or
    stops with the pipeline's one-line error (a loss that diverged); never a traceback."""
    params = tiny_run()
    features.main(params)
    tried, bad = [0], []

    def trains(dotted: str, value: Any) -> None:
        tried[0] += 1
        key = dotted.split(".", 1)[1]
        try:
            train_head.main(tiny_run(head={key: value, "epochs": min_epochs(key, value)}))
        except PipelineError as exc:
            if "\n" in str(exc):
                bad.append(f"{dotted}={value!r}: {exc}")
        except Exception as exc:  # noqa: BLE001 - what the test exists to catch
            bad.append(f"{dotted}={value!r}: {type(exc).__name__}: {exc}")

    for dotted in HEAD_KEYS:
        sweep(dotted, accepted(declared_type(dotted)), trials(12, 3), trains)
    record(
        "settings: accepted values of train_head's keys train on tiny data",
        tried[0],
        tried[0] - len(bad),
        keys=len(HEAD_KEYS),
    )
    assert bad == []


def min_epochs(key: str, value: Any) -> int:
    """Few epochs, so the sweep stays short, unless epochs is the key under test."""
    return value if key == "epochs" else 3
