"""The run report: built from a run's files, self-contained, escaped, checked in Chromium."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline.data.rawstore import write_store
from pipeline.reporting import scoring
from pipeline.reporting.headline import headline_markdown
from pipeline.stages import data_issues, report
from pipeline.system.fsutil import sha256_file
from tests.support.browser import SECTIONS, open_page, section_headings
from tests.support.images import noise_image
from tests.support.project import params_from, split_rows, write_split_rows
from tests.support.promotion import KEPT, PROMOTED

SCRIPT_CLASS = "<script>alert(1)</script>"
# Names from the data that would run script if they reached the page unescaped.
# Twelve classes: enough for the labelled heat map to outgrow a scrolling box.
CLASSES = ["cat", SCRIPT_CLASS, 'quote " & <b>bold</b>', "dog", *(f"class {i}" for i in range(8))]
HOSTILE_FILE = "data/raw/x/<img src=x onerror=alert(2)>.jpg"


def write_run(root: Path) -> dict:
    """The files a finished run leaves, for twelve classes (two with hostile names).

    Figures are computed from seeded logits with the pipeline's own scoring functions,
    so the page can be checked against them.
    """
    rng = np.random.default_rng(0)
    rows, files = [], []
    for c, label in enumerate(CLASSES):
        folder = root / "images" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(10):
            path = folder / f"img_{i}.png"
            noise_image(c * 100 + i).save(path)
            files.append((f"c{c}/img_{i}.png", label, path))
            rows.append(
                {"path": f"data/raw/c{c}/img_{i}.png", "label": label, "sha256": sha256_file(path)}
            )
    write_store(files, root / "data/raw")  # the raw store the thumbnails come from
    images = pd.DataFrame(rows)
    split_of = {i: "train" if i < 6 else ("val" if i < 8 else "test") for i in range(10)}
    images["split"] = [split_of[i % 10] for i in range(len(images))]
    write_split_rows(root / "data/splits", images)

    metrics = root / "metrics"
    (metrics / "plots").mkdir(parents=True)
    counts = {label: 10 for label in CLASSES}
    dump = lambda name, obj: (metrics / name).write_text(json.dumps(obj))  # noqa: E731
    dump("download.json", {"source": "builtin:digits", "sha256": None, "excluded_classes": []})
    checks = [
        {
            "expectation": "ExpectColumnValuesToNotBeNull",
            "column": "path",
            "describe": "path is never empty",
            "success": True,
            "hard": True,
            "unexpected_count": 0,
        },
        {
            "expectation": "ExpectColumnValuesToBeBetween",
            "column": "width",
            "describe": "width <b>in range</b>",
            "success": False,
            "hard": False,
            "unexpected_count": 1,
        },
    ]
    dump("validate.json", {
        "class_counts": counts, "classes": len(CLASSES), "images": 40, "files": 41,
        "quarantined": 1, "duplicates": 0, "duplicates_across_classes": 0,
        "expectations": {"name": "validate", "success": True, "evaluated": 2, "passed": 1, "checks": checks},
    })  # fmt: skip
    pd.DataFrame(
        [{"path": HOSTILE_FILE, "label": SCRIPT_CLASS, "reason": "not an image: HTML document"}]
    ).to_csv(metrics / "quarantine.csv", index=False)
    dump("split.json", {"duplicate_groups": 0, "near_duplicate_groups": 0, "dropped_classes": []})

    epochs = pd.DataFrame(
        {"epoch": [1, 2, 3], "train_loss": [1.2, 0.8, 0.6], "train_acc": [0.5, 0.7, 0.8],
         "val_loss": [1.0, 0.7, 0.75], "val_acc": [0.55, 0.75, 0.7]}
    )  # fmt: skip
    epochs.to_csv(metrics / "plots/train_head.csv", index=False)
    dump("train_head.json", {"best_epoch": 2, "epochs_run": 3, "lr": 0.001, "seconds": 1.5,
                             "val_acc": 0.75, "val_loss": 0.7})  # fmt: skip
    epochs.assign(epoch=[0, 1, 2]).to_csv(metrics / "plots/finetune.csv", index=False)
    dump("finetune.json", {"best_epoch": 1, "epochs_run": 2, "device": "cpu", "bf16": False,
                           "seconds": 9.0, "train_images_per_second": 12.5,
                           "val_acc": 0.75, "val_loss": 0.7})  # fmt: skip

    test = images[images["split"] == "test"].reset_index(drop=True)
    y = test["label"].map(CLASSES.index).to_numpy()
    evaluation, evaluated = {}, root / "reports/evaluate"
    evaluated.mkdir(parents=True)
    for name, noise in (("head", 2.0), ("finetuned", 1.0)):
        logits = rng.normal(size=(len(y), len(CLASSES))) * noise
        logits[np.arange(len(y)), y] += 2.0
        evaluation[name] = scoring.summary(logits, y, CLASSES, 1.0, n_bins=15)
        scoring.per_class_table(logits, y, CLASSES).to_csv(
            evaluated / f"per_class_{name}.csv", index=False
        )
        cm = scoring.confusion_matrix(logits, y, len(CLASSES))
        pd.DataFrame(scoring.most_confused(cm, CLASSES, top=20), columns=["true", "predicted", "count"]).to_csv(
            evaluated / f"most_confused_{name}.csv", index=False
        )  # fmt: skip
    probs = scoring.softmax(logits)
    pd.DataFrame(
        {"path": test["path"], "label": test["label"],
         "predicted": np.asarray(CLASSES, dtype=object)[probs.argmax(1)], "confidence": probs.max(1)}
    ).to_csv(evaluated / "predictions_finetuned.csv", index=False)  # fmt: skip
    dump("evaluate.json", evaluation)

    dump("onnx_check.json", {
        "passed": False, "failures": [f"class {SCRIPT_CLASS}: parity"], "images": len(y),
        "max_abs_diff": 3.2e-06, "batch1_max_abs_diff": 1.1e-06, "top1_agreement": 1.0,
        "torch_top1": evaluation["finetuned"]["top1"], "onnx_top1": evaluation["finetuned"]["top1"],
        "threads": 2, "batch_sizes": [1, 32], "size_mb": 19.3, "cpu_latency_ms_p50": 4.04,
        "cpu_latency_ms_p95": 4.27, "cpu_throughput_ips": 229.2,
        "int8": {"top1": 0.5, "size_mb": 5.4, "cpu_latency_ms_p50": 2.61, "cpu_latency_ms_p95": 2.76,
                 "cpu_throughput_ips": 479.1, "lost": 7, "gained": 2, "drop_p_value": 0.0123},
        "cpu": {"model": "AMD EPYC <b>test</b>", "machine": "x86_64",
                "features": ["sse4_1", "avx", "fma", "avx2"], "onnxruntime": "1.32.0",
                "onnxruntime_int8_kernel": "avx2 (vpmaddubsw: int16 pair sums saturate)",
                "int8_u8s8_exact": False},
    })  # fmt: skip
    (root / "models").mkdir()
    (root / "models/MODEL_CARD.md").write_text(
        "# Model card\n\nRaw HTML stays text: <script>alert(3)</script>\n\n"
        "| model | top1 |\n|---|---|\n| finetuned | 0.9 |\n"
    )
    (root / "dvc.lock").write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "validate": {
                        "cmd": "python -m pipeline validate",
                        "params": {"params.yaml": {"validate": {"min_side": 16}}},
                        "outs": [{"path": "data/manifest", "md5": "0123456789abcdef"}],
                    }
                },
            }
        )
    )
    (root / "logs/stages").mkdir(parents=True)
    (root / "logs/stages/validate.json").write_text(
        json.dumps(
            {"finished_at": "2026-11-23T12:00:00+00:00", "seconds": 3.25, "status": "succeeded"}
        )
    )
    return evaluation


@pytest.fixture
def finished_run(workspace):
    """A workspace (the current folder) holding a finished run's files; yields its params."""
    params = workspace()
    evaluation = write_run(Path.cwd())
    return params, evaluation


def test_report_shows_the_run_and_escapes_names_from_the_data(finished_run):
    params, evaluation = finished_run
    result = report.run(params)
    html = params.paths.report.read_text(encoding="utf-8")
    assert result["report"] == "reports/index.html"

    assert html.count("<script") == 1  # the page's own sorting script, nothing from the data
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")  # only as text
    assert "&lt;script&gt;alert(3)&lt;/script&gt;" in html  # the model card's raw HTML
    assert "quote &#34; &amp; &lt;b&gt;bold&lt;/b&gt;" in html or "quote &quot; &amp;" in html

    # Self-contained: every image is inline, every link stays on the page or beside it.
    assert re.findall(r'<img[^>]+src="(?!data:image/jpeg;base64,)', html) == []
    assert all(h.startswith("#") for h in re.findall(r'href="([^"]*)"', html))

    finetuned = evaluation["finetuned"]
    assert f"{finetuned['top1']:.4f}" in html and f"{finetuned['macro_f1']:.4f}" in html
    assert "2026-11-23T12:00:00+00:00" in html and "0123456789" in html  # provenance
    assert "FAILED" in html and "3.2e-06" in html
    # Where onnx_check ran, beside its latency figures (issue #16); escaped like all else.
    speed = html[html.index("<h3>CPU speed") : html.index('id="speed"')]
    assert "Measured on <strong>AMD EPYC &lt;b&gt;test&lt;/b&gt;</strong>" in speed
    assert "sse4_1, avx, fma, avx2" in speed and "onnxruntime 1.32.0" in speed
    assert "avx2 (vpmaddubsw: int16 pair sums saturate)" in speed
    assert "7 / 2 (0.012)" in html


def test_report_of_a_partial_run_says_what_has_not_run(workspace):
    params = workspace()
    Path("metrics").mkdir()
    Path("metrics/validate.json").write_text(
        json.dumps(
            {
                "class_counts": {"a": 5, "b": 7},
                "classes": 2,
                "images": 12,
                "files": 12,
                "quarantined": 0,
            }
        )  # fmt: skip
    )
    html = report.build(params)
    assert "evaluate has not run." in html and "onnx_check has not run." in html
    assert "12 in 2 classes" in html


def test_headline_table_is_the_flow_artifact(finished_run):
    params, evaluation = finished_run
    table = headline_markdown(params.paths)
    assert table.startswith("| figure | value |\n|---|---|\n")
    assert f"| test top-1, fine-tuned | {evaluation['finetuned']['top1']:.4f} |" in table
    assert "| ONNX parity check | FAILED |" in table
    assert "| ONNX max abs logit difference | 3.2e-06 |" in table
    assert "| CPU latency, batch 1, 2 threads | 4.0 ms (int8 2.6 ms) |" in table


def plant_a_label_error(root: Path) -> str:
    """The features' index, and one cat training image's embedding moved onto the dog
    images': the path data_issues should report as cat, suggested dog."""
    index = {"classes": sorted(CLASSES), "backbone": "b", "weights": "w", "engine": "e"}
    (root / "data/features/index.json").write_text(json.dumps(index))
    x = np.load(root / "data/features/train.npy")
    rows = split_rows(root, "train")
    moved = int(np.flatnonzero(rows["label"] == "cat")[0])
    x[moved] = x[(rows["label"] == "dog").to_numpy()].mean(axis=0)
    np.save(root / "data/features/train.npy", x)
    return rows["path"][moved]


def test_report_in_chromium(finished_run, tmp_path):
    params, evaluation = finished_run
    write_champion_and_features(Path.cwd())
    Path("metrics/promote.json").write_text(json.dumps(KEPT))
    moved = plant_a_label_error(Path.cwd())
    found = data_issues.main(params)
    report.run(params)
    with open_page(params.paths.report, tmp_path / "profile") as visit:
        page = visit.page
        assert section_headings(page) == SECTIONS
        # Hostile names show as the text they are, in tables, galleries and headings.
        assert page.get_by_text(SCRIPT_CLASS, exact=True).count() >= 2
        assert page.locator("img[onerror]").count() == 0
        assert page.locator("script").count() == 1
        # 4 curves, 2 bar charts, 1 heat map; the per-class table has one row per class.
        assert page.locator("svg.chart").count() == 7
        # The whole heat map shows: no box clips it (with 12 classes it is 580 px tall).
        assert page.locator("#heatmap").evaluate("e => e.scrollHeight <= e.clientHeight")
        table = page.locator("#per-class tbody tr")
        assert table.count() == len(CLASSES)

        def f1() -> list[float]:
            cells = page.locator("#per-class tbody tr td:nth-child(7)").all_inner_texts()
            return [float(t) for t in cells]

        page.locator("#per-class th", has_text="F1").click()
        assert f1() == sorted(f1())
        page.locator("#per-class th", has_text="F1").click()
        assert f1() == sorted(f1(), reverse=True)
        page.locator("input[data-filter=per-class]").fill("dog")
        assert page.locator("#per-class tbody tr:visible").all_inner_texts()[0].startswith("dog")
        assert page.locator("#per-class tbody tr:visible").count() == 1
        # The decision is the first thing on the page; the changes table sorts like the others.
        banner = page.locator("#promotion").bounding_box()
        assert banner["y"] < page.locator("header h1").bounding_box()["y"]
        assert page.locator("#promotion .title").inner_text().startswith("not promoted: ")
        assert page.locator("#changes-table tbody tr").count() == len(CLASSES)
        assert page.locator("#changes-table tbody tr").first.inner_text().startswith("cat")
        page.locator("#changes-table th", has_text="removed").click()  # ascending: cat's 3 last
        assert page.locator("#changes-table tbody tr").last.inner_text().startswith("cat")
        # data_issues' advice: the planted error first, with its thumbnail, filterable by kind.
        issues = page.locator("#issues-table tbody tr")
        assert found["label_errors"] >= 1 and issues.count() >= found["label_errors"]
        first = issues.first.locator("td").all_inner_texts()
        assert first[1:4] == ["likely label error", "cat", "dog"]
        assert Path(moved).name in first[5]
        assert issues.first.locator("img").count() == 1
        page.locator("input[data-filter=issues-table]").fill("likely label")
        assert page.locator("#issues-table tbody tr:visible").count() == found["label_errors"]
        page.locator("input[data-filter=issues-table]").fill("no such issue")
        assert page.locator("#issues-table tbody tr:visible").count() == 0

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 20_000
        assert visit.console_errors == [] and visit.page_errors == []
        assert visit.dialogs == [] and visit.outside_requests == []


def test_report_params_are_checked():
    with pytest.raises(Exception, match="report.thumbnail_px"):
        params_from({"report": {"thumbnail_px": 0}})


def test_stage_runs_are_logged_for_the_report(tmp_path):
    from pipeline.runner import logged_run

    log_file = tmp_path / "logs/stages/split.json"
    with logged_run(log_file):
        pass
    done = json.loads(log_file.read_text())
    assert done["status"] == "succeeded" and 0 <= done["seconds"] < 5
    # this test process has torch imported: well over 50 MB resident
    assert 50 < done["peak_rss_mb"] < 100_000 and done["peak_rss_children_mb"] >= 0
    assert done["started_at"] <= done["finished_at"]
    with pytest.raises(RuntimeError), logged_run(log_file):
        raise RuntimeError("the stage failed")
    assert json.loads(log_file.read_text())["status"] == "failed"


def test_paths_under_a_workspace():
    paths = params_from({}).paths.under(Path("/runs/a"))
    assert paths.report == Path("/runs/a/reports/index.html")
    assert paths.metrics_file("evaluate") == Path("/runs/a/metrics/evaluate.json")


def banner(html: str) -> str:
    return html[html.index('<div class="banner') : html.index("<h1>")]


def test_the_banner_says_not_promoted_and_why_before_anything_else(finished_run):
    params, _ = finished_run
    Path("metrics/promote.json").write_text(json.dumps(KEPT))
    html = report.build(params)
    top = banner(html)
    assert html.index('id="promotion"') < html.index("<h1>") < html.index('id="headline"')
    assert top.startswith('<div class="banner bad" id="promotion"')
    assert (
        "not promoted: the challenger is worse: top-1 0.4000 vs 0.9000 &lt;b&gt;(p = 1.2e-05)&lt;/b&gt;"
        in top
    )
    assert "production stays at version 2; this run&#39;s model is version 3" in top
    assert "challenger top-1 0.4000, mean per-class accuracy 0.3800; champion top-1 0.9000" in top
    assert "on 1,234 test images (17 left out" in top and "p = 1.2e-05" in top
    assert "right only by the challenger 5, only by the champion 622" in top


def test_the_banner_says_promoted_and_the_version(finished_run):
    params, _ = finished_run
    Path("metrics/promote.json").write_text(json.dumps(PROMOTED))
    top = banner(report.build(params))
    assert 'class="banner good"' in top and "promoted version 2 (was version 1)" in top
    assert "not promoted" not in top and "challenger top-1 0.9300" in top
    Path("metrics/promote.json").write_text(
        json.dumps(
            {
                "decision": "first",
                "version": 1,
                "production_version": 1,
                "reason": "no champion yet",
            }
        )
    )
    top = banner(report.build(params))
    assert (
        "promoted version 1: the first version, now production" in top
        and "champion top-1" not in top
    )


def test_without_promote_there_is_no_banner_and_no_champion(finished_run):
    params, _ = finished_run
    html = report.build(params)
    assert 'id="promotion"' not in html
    assert "No champion yet: promote has not recorded" in html


def write_champion_and_features(root: Path) -> None:
    """A champion that had the train and val images, and 3 cat images since removed; the
    features of this run, where dog's 2 new (test) images sit far from its kept ones."""
    splits = {s: split_rows(root, s) for s in ("train", "val", "test")}
    old = pd.concat([splits["train"].assign(split="train"), splits["val"].assign(split="val")])
    gone = pd.DataFrame(
        {"sha256": ["gone-0", "gone-1", "gone-2"], "label": "cat", "split": "train"}
    )
    pd.concat([old[["sha256", "label", "split"]], gone]).to_parquet(
        root / "data/champion_images.parquet"
    )
    rng = np.random.default_rng(0)
    centres = {label: rng.normal(size=8) * 5 for label in CLASSES}
    (root / "data/features").mkdir(parents=True)
    for split, rows in splits.items():
        x = np.stack([centres[label] + rng.normal(size=8) for label in rows["label"]])
        if split == "test":
            x[(rows["label"] == "dog").to_numpy()] += 10.0
        np.save(root / f"data/features/{split}.npy", x.astype(np.float32))


def test_since_the_champion_counts_and_flags_per_class(finished_run):
    params, _ = finished_run
    write_champion_and_features(Path.cwd())
    html = report.build(params)
    section = html[html.index('<section id="changes">') : html.index('<section id="training">')]
    assert "trained on 99 images; this run has 120: <b>24 added</b> and <b>3 removed</b>" in section

    def row(label: str) -> list[str]:
        start = section.index(f"<tr><td>{label}</td>")
        return re.findall(r"<td[^>]*>([^<]*)</td>", section[start : section.index("</tr>", start)])

    cat, dog = row("cat"), row("dog")
    assert cat[1:5] == ["11", "10", "2", "3"] and dog[1:5] == ["8", "10", "2", "0"]
    assert float(dog[-1]) < 0.05 and 'class="num flag"' in section
    assert float(cat[-1]) > 0.05
    assert "dog" in section[section.index('id="drift-summary"') :].split("</p>")[0]
    assert re.search(r'id="balance">Class balance: total variation distance .* p = <b', section)
