"""int8 quantization recipes side by side, on this CPU's kernels and on emulated ones.

In a workspace after ``export``: every recipe quantizes ``models/model.onnx`` the way
export does (calibrated on the same training images), then each int8 model and the fp32
model run over the whole test split on this CPU: top-1, drop against fp32, agreement
with fp32, and img/s at batch ``onnx_check.batch_size`` with ``onnx_check.threads``
threads. With ``--emulate CPU`` (e.g. ``Haswell-v4`` for AVX2, ``Nehalem`` for SSE4,
whose u8×s8 products are exact as on VNNI) a slice of ``--slice`` test images also runs
under ``qemu-x86_64 -cpu CPU``, and the int8 logits there are compared with this CPU's.
Prints one JSON object.

    python bench/int8_recipes.py --root WS [--recipes export,u8s8] \\
        [--emulate Haswell-v4 --emulate Nehalem --slice 24]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import images_per_second  # noqa: E402

RECIPES = {
    # name: quantize_static keyword arguments on top of QDQ and minmax calibration;
    # "export" is the recipe the export stage uses (pipeline.modeling.quantization.quantize_int8).
    "export": None,
    "u8s8": {"per_channel": True, "reduce_range": False},  # export's recipe until issue #16
    "u8s8_reduce_range": {"per_channel": True, "reduce_range": True},  # 7-bit weights everywhere
    "u8u8": {"per_channel": True, "weight_type": "QUInt8"},
    "s8s8": {"per_channel": True, "activation_type": "QInt8"},
    "u8s8_conv_only": {"per_channel": True, "op_types_to_quantize": ["Conv"]},
}


def child(model: str, inputs: str, output: str, threads: int) -> None:
    """Under the emulator: logits of ``model`` for the images in ``inputs`` (.npy)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    x = np.load(inputs)
    np.save(
        output,
        np.concatenate(
            [session.run(None, {"input": x[i : i + 8]})[0] for i in range(0, len(x), 8)]
        ),
    )


def quantize(fp32: Path, out: Path, images, recipe: dict | None) -> float:
    """Seconds to quantize ``fp32`` into ``out`` with ``recipe`` (calibrated on ``images``)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from pipeline.modeling.quantization import calibration_reader, quantize_int8
    from pipeline.stages.export import FEATURES

    started = time.perf_counter()
    if recipe is None:
        with tempfile.TemporaryDirectory() as cache:  # calibrated afresh, timed whole
            proto = quantize_int8(fp32, images, "minmax", FEATURES, Path(cache))
        onnx.save_model(proto, str(out))
        return time.perf_counter() - started
    kwargs = dict(recipe)
    prepared = out.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(
        str(prepared),
        str(out),
        calibration_reader(images.batches()),
        quant_format=QuantFormat.QDQ,
        activation_type=getattr(QuantType, kwargs.pop("activation_type", "QUInt8")),
        weight_type=getattr(QuantType, kwargs.pop("weight_type", "QInt8")),
        calibrate_method=CalibrationMethod.MinMax,
        **kwargs,
    )
    prepared.unlink()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("."))
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--emulate", action="append", default=[], metavar="QEMU_CPU")
    parser.add_argument("--slice", type=int, default=24, help="test images run under emulation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "INPUTS", "OUTPUT"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return

    import onnxruntime as ort

    from pipeline.config import load_params
    from pipeline.data.images import load_rgb
    from pipeline.data.rawstore import RawStore
    from pipeline.data.splits import read_split
    from pipeline.modeling.quantization import CalibrationImages
    from pipeline.serving.predict import OnnxClassifier
    from pipeline.stages.export import INPUT, calibration_rows
    from pipeline.system.cpu import cpu_info

    os.chdir(args.root)
    params = load_params("params.yaml")
    paths, cfg = params.paths, params.onnx_check
    fp32 = OnnxClassifier(paths.onnx, cfg.threads)
    pre = fp32.contract.preprocessing
    rows = read_split(paths, "test")
    lookup = {c: i for i, c in enumerate(fp32.contract.classes)}
    y = rows["label"].map(lookup).to_numpy()
    store = RawStore.open(paths.raw)
    x = np.stack([pre(load_rgb(ref)) for ref in store.locate(rows["path"])])
    picked = calibration_rows(paths, params.export.calibration_images, params.split.seed)
    calibration = CalibrationImages(
        store.locate(picked["path"]), picked["sha256"].tolist(), pre, INPUT
    )

    def all_logits(session) -> np.ndarray:
        return np.concatenate(
            [session.logits(x[i : i + cfg.batch_size]) for i in range(0, len(x), cfg.batch_size)]
        )

    reference = all_logits(fp32)
    picks = np.linspace(0, len(x) - 1, min(args.slice, len(x))).round().astype(int)
    timing = np.resize(x, (cfg.batch_size, *x.shape[1:]))
    result: dict = {
        "cpu": cpu_info().to_dict(),
        "onnxruntime": ort.__version__,
        "test_images": int(len(y)),
        "fp32_top1": float((reference.argmax(1) == y).mean()),
        "recipes": {},
    }
    sessions = {"fp32": fp32}
    with tempfile.TemporaryDirectory(prefix="int8-recipes-") as tmp:
        slice_file = Path(tmp) / "slice.npy"
        np.save(slice_file, x[picks])
        for name in args.recipes.split(","):
            path = Path(tmp) / f"{name}.onnx"
            with contextlib.redirect_stdout(sys.stderr):  # the calibrators print progress
                seconds = quantize(paths.onnx, path, calibration, RECIPES[name])
            session = OnnxClassifier.__new__(OnnxClassifier)
            options = ort.SessionOptions()
            options.intra_op_num_threads = cfg.threads
            session.session = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
            session.input_name = "input"
            sessions[name] = session
            logits = all_logits(session)
            top1 = float((logits.argmax(1) == y).mean())
            entry = {
                "quantize_s": round(seconds, 1),
                "top1": top1,
                "drop_pt": round(100 * (result["fp32_top1"] - top1), 2),
                "agreement_with_fp32": float((logits.argmax(1) == reference.argmax(1)).mean()),
                "flipped": {
                    "fp32_right_int8_wrong": int(
                        ((reference.argmax(1) == y) & (logits.argmax(1) != y)).sum()
                    ),
                    "int8_right_fp32_wrong": int(
                        ((reference.argmax(1) != y) & (logits.argmax(1) == y)).sum()
                    ),
                },
                "size_mb": round(path.stat().st_size / 1e6, 2),
                "emulated": {},
            }
            for cpu in args.emulate:
                out = Path(tmp) / f"{name}-{cpu}.npy"
                started = time.perf_counter()
                done = subprocess.run(
                    [
                        "qemu-x86_64",
                        "-cpu",
                        cpu,
                        sys.executable,
                        __file__,
                        "--child",
                        str(path),
                        str(slice_file),
                        str(out),
                    ],
                    capture_output=True,
                    text=True,
                )
                if done.returncode != 0:
                    entry["emulated"][cpu] = {"error": done.stderr[-800:]}
                    continue
                emulated, native = np.load(out), logits[picks]
                entry["emulated"][cpu] = {
                    "images": int(len(picks)),
                    "seconds": round(time.perf_counter() - started, 1),
                    "max_abs_diff_vs_native": float(np.abs(emulated - native).max()),
                    "argmax_agreement_vs_native": float(
                        (emulated.argmax(1) == native.argmax(1)).mean()
                    ),
                    "argmax_agreement_vs_fp32": float(
                        (emulated.argmax(1) == reference[picks].argmax(1)).mean()
                    ),
                    "top1": float((emulated.argmax(1) == y[picks]).mean()),
                    "fp32_top1": float((reference[picks].argmax(1) == y[picks]).mean()),
                }
            result["recipes"][name] = entry
            sys.stderr.write(f"{name}: {json.dumps(entry)}\n")
        rounds: dict[str, list[float]] = {name: [] for name in sessions}
        for s in sessions.values():
            s.logits(timing)
        for _ in range(args.rounds):
            for name, s in sessions.items():
                rounds[name].append(
                    images_per_second(lambda s=s: s.logits(timing), cfg.batch_size, 3)
                )
    ips = {name: statistics.median(v) for name, v in rounds.items()}
    result["fp32_ips"] = round(ips["fp32"], 1)
    for name in result["recipes"]:
        result["recipes"][name]["ips"] = round(ips[name], 1)
        result["recipes"][name]["speedup_vs_fp32"] = round(ips[name] / ips["fp32"], 2)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
