"""Stage ``finetune``: backbone + trained head, the last blocks unfrozen, like fastai's ``fine_tune``.

Discriminative learning rates (backbone lr = ``finetune.lr`` × ``backbone_lr_mult``),
linear warmup then cosine decay, transforms.v2 augmentation, early stopping on val loss,
bf16 autocast where the hardware has it. A checkpoint is written atomically after every
epoch; a rerun with the same inputs and params resumes from it instead of starting over.
Each epoch seeds its own shuffling, augmentation and dropout, so a resumed run follows
the same path as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict

import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.backbones import build_backbone
from pipeline.config import FinetuneParams, ModelParams, Params, Paths
from pipeline.data import ImageDataset, make_loader, train_transform
from pipeline.features import read_split
from pipeline.fsutil import atomic_path, remove, sha256_file, write_json_atomic
from pipeline.model import (
    Classifier,
    classifier_from_head,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.runtime import Runtime, resolve
from pipeline.train_head import check_finite

log = logging.getLogger(__name__)


def freeze_all_but_last(
    model: Classifier, blocks: list[nn.Module], unfreeze: int | str
) -> list[nn.Module]:
    """Freeze the backbone except its last ``unfreeze`` blocks; return the trainable blocks."""
    n = len(blocks) if unfreeze == "all" else min(int(unfreeze), len(blocks))
    trainable = blocks[len(blocks) - n :] if n else []
    model.backbone.requires_grad_(False)
    for block in trainable:
        block.requires_grad_(True)
    return trainable


def set_train_mode(model: Classifier, trainable: list[nn.Module]) -> None:
    """Train mode for the head and unfrozen blocks, but every BatchNorm keeps its statistics.

    Batch statistics of small, augmented batches pull the ImageNet running statistics
    away from what the head was trained on (measured: val accuracy fell from 97% to 32%
    in one epoch on the digits); BatchNorm's affine weights still train.
    """
    model.eval()
    model.head.train()
    for block in trainable:
        block.train()
        for module in block.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def lr_lambda(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.inference_mode()
def predict_logits(model: nn.Module, loader, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over a loader, in dataset order."""
    model.eval()
    logits, labels = [], []
    for images, y, _index in loader:
        with runtime.autocast():
            out = model(runtime.to_device(images))
        logits.append(out.float().cpu())
        labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def fingerprint(paths: Paths, model_cfg: ModelParams, cfg: FinetuneParams, bf16: bool) -> str:
    """What a checkpoint must match to be resumed: inputs, params and precision."""
    parts = {
        "head": sha256_file(paths.head),
        "model": asdict(model_cfg),
        "finetune": asdict(cfg),
        "bf16": bf16,
        "splits": [sha256_file(paths.split_file(s)) for s in ("train", "val")],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def run(paths: Paths, model_cfg: ModelParams, cfg: FinetuneParams, device: str) -> dict:
    started = time.perf_counter()
    runtime = resolve(device, cfg.precision)
    card, head_ckpt = load_checkpoint(paths.head)
    backbone = build_backbone(model_cfg.backbone, model_cfg.weights)
    model = classifier_from_head(backbone, card, head_ckpt["state_dict"])
    lookup = {c: i for i, c in enumerate(card.classes)}
    train_rows, val_rows = read_split(paths, "train"), read_split(paths, "val")
    history: list[dict] = []
    images_seen, train_seconds = 0, 0.0

    if cfg.epochs > 0:
        model = model.to(runtime.device, memory_format=torch.channels_last)
        trainable = freeze_all_but_last(model, backbone.blocks, cfg.unfreeze_blocks)
        backbone_params = [p for b in trainable for p in b.parameters()]
        optimiser = torch.optim.AdamW(
            [
                {"params": model.head.parameters(), "lr": cfg.lr},
                {"params": backbone_params, "lr": cfg.lr * cfg.backbone_lr_mult},
            ],
            weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = len(train_rows) // cfg.batch_size or 1
        total = steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lr_lambda(total, round(total * cfg.warmup_fraction))
        )
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        train_set = ImageDataset(
            train_rows["path"],
            train_rows["label"].map(lookup),
            train_transform(card.preprocessing, cfg.augment),
        )
        val_loader = make_loader(
            ImageDataset(val_rows["path"], val_rows["label"].map(lookup), card.preprocessing),
            runtime,
            64,
        )

        checkpoint = paths.checkpoints / "finetune.pt"
        key = fingerprint(paths, model_cfg, cfg, runtime.bf16)
        first_epoch, best_state, best_loss, waited = 1, None, math.inf, 0
        if checkpoint.exists():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
            if saved["fingerprint"] == key:
                model.load_state_dict(saved["model"])
                optimiser.load_state_dict(saved["optimiser"])
                scheduler.load_state_dict(saved["scheduler"])
                first_epoch, best_loss, waited = (
                    saved["epoch"] + 1,
                    saved["best_loss"],
                    saved["waited"],
                )
                best_state, history = saved["best_state"], saved["history"]
                log.info("resuming finetune from the checkpoint after epoch %d", saved["epoch"])
            else:
                log.info("ignoring %s: it was written for other inputs or params", checkpoint)

        if first_epoch == 1:  # epoch 0: the head alone, the bar fine-tuning has to beat
            val_logits, val_y = predict_logits(model, val_loader, runtime)
            best_loss = nn.functional.cross_entropy(val_logits, val_y).item()
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            history.append(
                {
                    "epoch": 0,
                    "train_loss": None,
                    "train_acc": None,
                    "val_loss": best_loss,
                    "val_acc": (val_logits.argmax(1) == val_y).float().mean().item(),
                }
            )
        for epoch in range(first_epoch, cfg.epochs + 1):
            if waited >= cfg.patience:
                break
            torch.manual_seed(cfg.seed + epoch)
            set_train_mode(model, trainable)
            loader = make_loader(
                train_set,
                runtime,
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed + epoch,
                drop_last=True,
            )
            epoch_start, loss_sum, correct, seen = time.perf_counter(), 0.0, 0, 0
            with tqdm(
                total=steps_per_epoch * cfg.batch_size,
                unit="img",
                desc=f"finetune {epoch}/{cfg.epochs}",
                disable=None,
            ) as bar:
                for images, y, _index in loader:
                    images, y = runtime.to_device(images), y.to(runtime.device, non_blocking=True)
                    with runtime.autocast():
                        logits = model(images)
                        loss = criterion(logits.float(), y)
                    check_finite(loss, f"in finetune epoch {epoch}")
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                    scheduler.step()
                    loss_sum += loss.item() * len(y)
                    correct += (logits.argmax(1) == y).sum().item()
                    seen += len(y)
                    bar.update(len(y))
            train_seconds += time.perf_counter() - epoch_start
            images_seen += seen
            val_logits, val_y = predict_logits(model, val_loader, runtime)
            val_loss = nn.functional.cross_entropy(val_logits, val_y).item()
            val_acc = (val_logits.argmax(1) == val_y).float().mean().item()
            history.append(
                {
                    "epoch": epoch,
                    "train_loss": loss_sum / seen,
                    "train_acc": correct / seen,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                }
            )
            log.info(
                "epoch %d: train loss %.4f, val loss %.4f, val acc %.4f",
                epoch,
                loss_sum / seen,
                val_loss,
                val_acc,
            )
            if val_loss < best_loss - 1e-4:
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
                best_loss, waited = val_loss, 0
            else:
                waited += 1
            state = {
                "fingerprint": key,
                "epoch": epoch,
                "model": model.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "best_state": best_state,
                "best_loss": best_loss,
                "waited": waited,
                "history": history,
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
        if best_state is not None:
            model.load_state_dict(best_state)
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(paths.model, card, state_dict, params=asdict(cfg))
    remove(paths.checkpoints / "finetune.pt")
    frame = pd.DataFrame(
        history, columns=["epoch", "train_loss", "train_acc", "val_loss", "val_acc"]
    )
    with atomic_path(paths.plots / "finetune.csv") as tmp:
        frame.round(6).to_csv(tmp, index=False)
    trained = frame[frame["epoch"] > 0]
    best_epoch = int(frame.loc[frame["val_loss"].idxmin(), "epoch"]) if len(trained) else 0
    if len(trained) and best_epoch == 0:
        log.warning(
            "fine-tuning never beat the head alone on val loss; keeping backbone + head as they were"
        )
    metrics = {
        "epochs_run": len(trained),
        "best_epoch": best_epoch,
        "val_loss": round(float(frame["val_loss"].min()), 6) if len(frame) else None,
        "val_acc": round(float(frame.loc[frame["val_loss"].idxmin(), "val_acc"]), 6)
        if len(frame)
        else None,
        "train_images_per_second": round(images_seen / train_seconds, 1) if train_seconds else None,
        "seconds": round(time.perf_counter() - started, 2),
        "device": str(runtime.device),
        "bf16": runtime.bf16,
    }
    write_json_atomic(paths.metrics_file("finetune"), metrics)
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.model, params.finetune, params.device)
