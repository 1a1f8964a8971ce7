"""Run Great Expectations checks on in-memory tables, for the ``validate`` and ``split`` stages.

A stage states its checks as plain :class:`Check` values (a GX expectation class name and
its kwargs) per table, calls :func:`run_suite`, and raises :class:`~pipeline.errors.DataError`
with :func:`format_failures` when :attr:`SuiteResult.success` is False. GX itself is imported
only inside :func:`run_suite`: it is slow to import and most commands never need it.

Each run uses a fresh in-memory (ephemeral) GX context, so nothing is written to the
working directory (no ``gx/`` project); with ``docs_dir`` the validation results are also
rendered as GX Data Docs HTML into exactly that folder, replaced atomically.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import PipelineError
from pipeline.system import fsutil

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

#: How many offending values (and row labels) a result keeps for messages.
MAX_OFFENDING = 20

_DATASOURCE = "pipeline"
_DOCS_SITE = "pipeline_site"


@dataclass(frozen=True)
class Check:
    """One expectation to run: a GX expectation class name + kwargs, and whether it is hard.

    A failing hard check fails the stage; a failing soft check is only reported.
    """

    expectation: str  # e.g. "ExpectColumnValuesToNotBeNull"
    kwargs: dict[str, Any]  # e.g. {"column": "path"}
    hard: bool = True  # soft checks are reported only
    describe: str = ""  # human text, e.g. "every class has at least 5 images"

    @property
    def column(self) -> str | None:
        """The column(s) the check is about, for messages; None for table-level checks."""
        if "column" in self.kwargs:
            return str(self.kwargs["column"])
        if "column_A" in self.kwargs and "column_B" in self.kwargs:
            return f"{self.kwargs['column_A']}, {self.kwargs['column_B']}"
        if "column_list" in self.kwargs:
            return ", ".join(str(c) for c in self.kwargs["column_list"])
        return None


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one :class:`Check` on one table."""

    check: Check
    success: bool
    offending: list[Any]  # up to MAX_OFFENDING unexpected values, JSON-able
    observed: Any  # GX's observed_value where it gives one, else None
    table: str = ""
    unexpected_count: int | None = None
    rows: list[Any] = field(default_factory=list)  # index labels of offending rows, if any
    error: str | None = None  # set when the check could not run (e.g. unknown column)

    @property
    def blocking(self) -> bool:
        """True if this result fails the suite: a failed hard check, or any check that errored.

        A check that could not run is a bug in the check list, not a finding about the data,
        so it blocks even when soft; otherwise a misspelled column would pass forever.
        """
        return not self.success and (self.check.hard or self.error is not None)


@dataclass(frozen=True)
class SuiteResult:
    """All check results of one :func:`run_suite` call."""

    name: str
    results: list[CheckResult]

    @property
    def success(self) -> bool:
        """True when every hard check passed and every check could run."""
        return not any(r.blocking for r in self.results)

    def failures(self, hard_only: bool = True) -> list[CheckResult]:
        """Failed results: the blocking ones (default), or every failed one."""
        if hard_only:
            return [r for r in self.results if r.blocking]
        return [r for r in self.results if not r.success]

    def summary(self) -> dict[str, Any]:
        """JSON-able counts and per-check outcomes, for metrics files and logs."""
        return {
            "name": self.name,
            "success": self.success,
            "evaluated": len(self.results),
            "passed": sum(r.success for r in self.results),
            "failed_hard": sum(not r.success and r.check.hard for r in self.results),
            "failed_soft": sum(not r.success and not r.check.hard for r in self.results),
            "errored": sum(r.error is not None for r in self.results),
            "checks": [
                {
                    "table": r.table,
                    "expectation": r.check.expectation,
                    "column": r.check.column,
                    "describe": r.check.describe,
                    "success": r.success,
                    "hard": r.check.hard,
                    "unexpected_count": r.unexpected_count,
                    "offending": r.offending,
                    "rows": r.rows,
                    "observed": r.observed,
                    "error": r.error,
                }
                for r in self.results
            ],
        }


def run_suite(
    name: str,
    frames: Mapping[str, pd.DataFrame],
    checks: Mapping[str, list[Check]],
    docs_dir: Path | None = None,
) -> SuiteResult:
    """Validate each table in ``frames`` against its checks with GX Core.

    Args:
        name: suite name, used in logs and as the prefix of the GX suite names in Data Docs.
        frames: table name -> DataFrame (e.g. ``"manifest"``, ``"class_counts"``).
        checks: table name -> checks on that table; every table named here needs a frame.
        docs_dir: when given, GX Data Docs for this run replace the content of this folder
            (``docs_dir/index.html`` is the entry point).

    Returns:
        One :class:`CheckResult` per check, in the order of ``checks``.

    Raises:
        ValueError: a table has checks but no frame, or a check names an unknown
            expectation or bad kwargs (a bug in the calling stage).
        PipelineError: Data Docs could not be written.
    """
    missing = sorted(set(checks) - set(frames))
    if missing:
        raise ValueError(
            f"suite {name!r}: checks given for table(s) {missing} with no frame; "
            f"frames given: {sorted(frames)}"
        )
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    with _quiet_gx_logs():
        # The expectation objects are built before any context exists, so a typo fails fast.
        expectations = {
            table: [_build_expectation(check, i, table) for i, check in enumerate(table_checks)]
            for table, table_checks in checks.items()
        }
        if docs_dir is None:
            results = _validate(name, frames, checks, expectations, docs_dir=None)
        else:
            with fsutil.atomic_path(Path(docs_dir)) as tmp:
                results = _validate(name, frames, checks, expectations, docs_dir=tmp)
                if not (tmp / "index.html").is_file():
                    raise PipelineError(
                        f"GX Data Docs for suite {name!r} wrote no index.html under {tmp}; "
                        "check the great_expectations install"
                    )
            log.info("suite %s: Data Docs written to %s", name, Path(docs_dir) / "index.html")
    suite_result = SuiteResult(name=name, results=results)
    _log_outcome(suite_result)
    return suite_result


def format_failures(result: SuiteResult) -> str:
    """A multi-line message naming each blocking check, its column and offending values."""
    failures = result.failures(hard_only=True)
    if not failures:
        return f"suite {result.name!r}: all hard checks passed"
    lines = [f"suite {result.name!r}: {len(failures)} check(s) failed:"]
    for r in failures:
        what = r.check.describe or r.check.expectation
        where = f"table {r.table!r}" + (f", column {r.check.column!r}" if r.check.column else "")
        lines.append(f"  - {what} [{r.check.expectation}; {where}]")
        if r.error is not None:
            lines.append(f"      could not run: {r.error}")
            continue
        if r.unexpected_count is not None:
            lines.append(f"      {r.unexpected_count} offending value(s)")
        if r.offending and not all(v is None for v in r.offending):
            lines.append(f"      values: {_clip(r.offending, r.unexpected_count)}")
        if r.rows:
            lines.append(f"      rows: {_clip(r.rows, r.unexpected_count)}")
        if r.observed is not None and not r.offending:
            lines.append(f"      observed: {r.observed!r}")
    return "\n".join(lines)


@contextlib.contextmanager
def _quiet_gx_logs() -> Iterator[None]:
    """Hold GX's own INFO chatter (registry, datasource loading) back while we run it.

    Only when nobody configured the ``great_expectations`` logger; its level is restored after.
    """
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level != logging.NOTSET:
        yield
        return
    gx_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        gx_logger.setLevel(logging.NOTSET)


def _clip(values: list[Any], total: int | None) -> str:
    more = (total or 0) - len(values)
    return repr(values) + (f" and {more} more" if more > 0 else "")


def _build_expectation(check: Check, index: int, table: str) -> Any:
    """The GX expectation object for ``check``; meta carries its index to pair results back."""
    import great_expectations.expectations as gxe

    cls = getattr(gxe, check.expectation, None)
    if not (isinstance(cls, type) and issubclass(cls, gxe.Expectation)):
        known = [n for n in dir(gxe) if n.startswith("Expect")]
        close = difflib.get_close_matches(check.expectation, known, n=3)
        hint = f"; did you mean {close}?" if close else f"; known: {known}"
        raise ValueError(
            f"table {table!r}: {check.expectation!r} is not a GX expectation class{hint}"
        )
    try:
        return cls(
            **check.kwargs,
            description=check.describe or None,
            meta={"pipeline_check": index},
        )
    except Exception as exc:  # pydantic's ValidationError; its text names the bad field
        raise ValueError(
            f"table {table!r}: bad kwargs {check.kwargs!r} for {check.expectation}: {exc}"
        ) from exc


def _validate(
    name: str,
    frames: Mapping[str, pd.DataFrame],
    checks: Mapping[str, list[Check]],
    expectations: Mapping[str, list[Any]],
    docs_dir: Path | None,
) -> list[CheckResult]:
    """Run every table's suite in one ephemeral context; build Data Docs if asked."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    sites = {}
    if docs_dir is not None:
        sites[_DOCS_SITE] = {
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(Path(docs_dir).resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        }
    # In-memory stores and an explicit docs site (or none): the default ephemeral context
    # would point its docs site at a throwaway temp folder instead.
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites=sites,
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    context = gx.get_context(mode="ephemeral", project_config=config)
    datasource = context.data_sources.add_pandas(_DATASOURCE)
    run_id = RunIdentifier(run_name=name)
    # SUMMARY gives counts, a sample of unexpected values and their index labels, without
    # materialising full unexpected lists on large tables.
    result_format = {"result_format": "SUMMARY", "partial_unexpected_count": MAX_OFFENDING}

    results: list[CheckResult] = []
    for table, table_checks in checks.items():
        if not table_checks:
            continue
        asset = datasource.add_dataframe_asset(table)
        batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        suite = context.suites.add(
            gx.ExpectationSuite(name=f"{name}.{table}", expectations=expectations[table])
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{name}.{table}", data=batch_definition, suite=suite)
        )
        validation = definition.run(
            batch_parameters={"dataframe": frames[table]},
            result_format=result_format,
            run_id=run_id,
        )
        # GX regroups expectations by column, so pair results by the index stored in meta.
        by_index = {e.expectation_config.meta["pipeline_check"]: e for e in validation.results}
        results.extend(
            _check_result(check, table, by_index[i]) for i, check in enumerate(table_checks)
        )

    if docs_dir is not None:
        context.build_data_docs(site_names=[_DOCS_SITE])
    return results


def _check_result(check: Check, table: str, gx_result: Any) -> CheckResult:
    """Translate one GX ExpectationValidationResult into a :class:`CheckResult`."""
    payload = dict(gx_result.result or {})
    error = None
    if not gx_result.success and not payload:
        # An empty result means the metric never evaluated (e.g. the column does not exist).
        messages = {
            str(info.get("exception_message"))
            for info in (gx_result.exception_info or {}).values()
            if isinstance(info, dict) and info.get("exception_message")
        }
        error = "; ".join(sorted(messages)) or "GX could not evaluate this expectation"
    count = payload.get("unexpected_count")
    return CheckResult(
        check=check,
        success=bool(gx_result.success),
        offending=_plain(payload.get("partial_unexpected_list") or [])[:MAX_OFFENDING],
        observed=_plain(payload.get("observed_value")),
        table=table,
        unexpected_count=None if count is None else int(count),
        rows=_plain(payload.get("partial_unexpected_index_list") or [])[:MAX_OFFENDING],
        error=error,
    )


def _plain(value: Any) -> Any:
    """A JSON-able copy of a GX result value (numpy scalars, NaN/NA, tuples made plain)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_plain(v) for v in value]
    import pandas as pd

    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy scalar
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _log_outcome(result: SuiteResult) -> None:
    for r in result.results:
        what = r.check.describe or r.check.expectation
        if r.error is not None:
            log.error("suite %s: %s on %s could not run: %s", result.name, what, r.table, r.error)
        elif not r.success:
            found = (
                f"observed {r.observed!r}"
                if r.unexpected_count is None
                else f"{r.unexpected_count} offending, e.g. {r.offending[:5]}"
            )
            log.warning(
                "suite %s: %s check %r failed on %s: %s",
                result.name,
                "hard" if r.check.hard else "soft",
                what,
                r.table,
                found,
            )
    summary = result.summary()
    log.info(
        "suite %s: %d/%d checks passed (%d hard, %d soft failed, %d errored); success=%s",
        result.name,
        summary["passed"],
        summary["evaluated"],
        summary["failed_hard"],
        summary["failed_soft"],
        summary["errored"],
        result.success,
    )
