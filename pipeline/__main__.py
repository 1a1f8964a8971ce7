"""``python -m pipeline <stage>``: run one stage with the settings in params.yaml.

This is the command dvc.yaml runs for each stage (through ``bin/stage``); the stage
modules do the work (``pipeline/runner.py`` runs them). Seven commands are not stages:
``python -m pipeline predict --model models/model.onnx IMAGE_OR_DIR...`` labels images
with the exported model and runs where only onnxruntime, numpy and Pillow are installed;
``python -m pipeline verify`` re-hashes DVC's outputs and cache against dvc.lock
(``pipeline/system/verify.py``); ``python -m pipeline deps --check`` (or ``--write``)
compares dvc.yaml's code deps with each stage's imports (``pipeline/system/codedeps.py``);
``python -m pipeline settings`` prints the settings reference (``--write``: docs/settings.md);
``python -m pipeline outputs`` lists where the outputs are, with the headline figures;
``python -m pipeline registry list|set-production N|rollback`` looks at the model registry
and moves its production alias (``pipeline/registry/cli.py``); ``python -m pipeline table
data/splits`` prints a segmented table's rows as CSV (``pipeline/data/segments.py``).
Each is dispatched before anything else is imported.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        from pipeline.serving.followed import resolve_model
        from pipeline.serving.predict import main as predict

        return predict(argv[1:], resolve_model)
    if argv[:1] == ["verify"]:
        from pipeline.system.verify import main as verify

        return verify(argv[1:])
    if argv[:1] == ["deps"]:
        from pipeline.system.codedeps import main as deps

        return deps(argv[1:])
    if argv[:1] == ["settings"]:
        from pipeline.system.settingsdoc import main as settings

        return settings(argv[1:])
    if argv[:1] == ["registry"]:
        from pipeline.registry.cli import main as registry

        return registry(argv[1:])
    if argv[:1] == ["outputs"]:
        from pipeline.reporting.headline import main as outputs

        return outputs(argv[1:])
    if argv[:1] == ["table"]:
        from pipeline.data.segments import main as table

        return table(argv[1:])
    from pipeline.runner import main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
