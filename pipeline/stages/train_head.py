"""Stage ``train_head``: a classifier head trained on cached features, in seconds.

AdamW with label smoothing, optional class-balanced loss, early stopping on validation
loss (the best epoch's weights are kept). ``head.lr: auto`` runs a learning-rate range
test on the features first, as fastai's ``lr_find`` does, and logs what it picked.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from torch import nn

from pipeline.config import HeadParams, Params, Paths
from pipeline.data.featurestore import Labelled, labelled, load_features
from pipeline.data.preprocessing import Preprocessing
from pipeline.modeling.model import HeadSpec, ModelCard, make_head, save_checkpoint
from pipeline.modeling.training import (
    adamw,
    check_finite,
    check_gradients,
    training_criterion,
    write_curves,
)
from pipeline.system.fsutil import write_json_atomic

log = logging.getLogger(__name__)


def find_lr(
    x: torch.Tensor,
    y: torch.Tensor,
    spec: HeadSpec,
    cfg: HeadParams,
    criterion: nn.Module,
    start: float = 1e-6,
    end: float = 1.0,
    steps: int = 100,
) -> float:
    """Learning-rate range test: raise the lr exponentially, pick a tenth of the loss minimum's lr."""
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    head = make_head(spec)
    optimiser = adamw(head.parameters(), cfg.weight_decay, lr=start)
    factor = (end / start) ** (1 / (steps - 1))
    lrs, losses, smooth = [], [], 0.0
    for step in range(steps):
        lr = start * factor**step
        for group in optimiser.param_groups:
            group["lr"] = lr
        batch = torch.randint(len(x), (cfg.batch_size,), generator=generator)
        loss = criterion(head(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        smooth = 0.9 * smooth + 0.1 * loss.item()
        value = smooth / (1 - 0.9 ** (step + 1))
        if not math.isfinite(value) or (losses and value > 4 * min(losses)):
            break
        lrs.append(lr)
        losses.append(value)
    best = lrs[int(np.argmin(losses))]
    chosen = best / 10
    log.info("lr range test: loss lowest at lr=%.2g; using head.lr=%.2g", best, chosen)
    return chosen


def evaluate_head(head: nn.Module, data: Labelled, criterion: nn.Module) -> tuple[float, float]:
    head.eval()
    with torch.inference_mode():
        logits = head(torch.tensor(data.x))
        y = torch.tensor(data.y)
        return criterion(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


def fit_head(
    train: Labelled, val: Labelled, spec: HeadSpec, cfg: HeadParams
) -> tuple[nn.Module, list[dict], dict]:
    """Train a head with early stopping on val loss; return the best head, its history (a
    row per epoch) and facts."""
    x, y = torch.tensor(train.x), torch.tensor(train.y)
    criterion = training_criterion(train.y, spec.n_classes, cfg.class_balanced, cfg.label_smoothing)
    plain = nn.CrossEntropyLoss()  # val loss is comparable across settings
    lr = find_lr(x, y, spec, cfg, criterion) if cfg.lr == "auto" else float(cfg.lr)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    head = make_head(spec)
    params = list(head.parameters())
    optimiser = adamw(params, cfg.weight_decay, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(cfg.epochs, 1))
    history, best, best_loss, waited = [], None, math.inf, 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = torch.randperm(len(x), generator=generator)
        total, correct = 0.0, 0
        for start in range(0, len(x), cfg.batch_size):
            batch = order[start : start + cfg.batch_size]
            logits = head(x[batch])
            loss = criterion(logits, y[batch])
            where = f"in train_head epoch {epoch} step {start // cfg.batch_size + 1}"
            check_finite(loss, where)
            optimiser.zero_grad()
            loss.backward()
            check_gradients(params, None, where)
            optimiser.step()
            total += loss.item() * len(batch)
            correct += (logits.argmax(1) == y[batch]).sum().item()
        scheduler.step()
        val_loss, val_acc = evaluate_head(head, val, plain)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(x),
                "train_acc": correct / len(x),
                "val_loss": val_loss,
                "val_acc": val_acc,
            }
        )
        if val_loss < best_loss - 1e-4:
            best, best_loss, waited = copy.deepcopy(head.state_dict()), val_loss, 0
        else:
            waited += 1
            if waited >= cfg.patience:
                log.info(
                    "early stop at epoch %d: val loss has not improved for %d epochs", epoch, waited
                )
                break
    if best is not None:
        head.load_state_dict(best)
    best_row = min(history, key=lambda row: row["val_loss"])  # the first of equals
    facts = {
        "lr": lr,
        "epochs_run": len(history),
        "best_epoch": int(best_row["epoch"]),
        "val_loss": round(float(best_row["val_loss"]), 6),
        "val_acc": round(float(best_row["val_acc"]), 6),
    }
    return head.eval(), history, facts


def train_set(arrays: dict[str, np.ndarray], train: Labelled) -> Labelled:
    """The training features plus any cached augmented views of them."""
    if "train_aug" not in arrays:
        return train
    views = arrays["train_aug"]  # (N, V, D)
    x = np.concatenate([train.x, views.reshape(-1, views.shape[-1])])
    y = np.concatenate([train.y, np.repeat(train.y, views.shape[1])])
    return Labelled(x, y)


def run(paths: Paths, cfg: HeadParams) -> dict:
    started = time.perf_counter()
    arrays, index = load_features(paths)
    classes = index["classes"]
    train = labelled(paths, arrays, classes, "train")
    val = labelled(paths, arrays, classes, "val")
    spec = HeadSpec(cfg.type, int(index["feature_dim"]), len(classes), cfg.hidden, cfg.dropout)
    head, history, facts = fit_head(train_set(arrays, train), val, spec, cfg)
    card = ModelCard(
        index["backbone"],
        index["weights"],
        classes,
        Preprocessing.from_dict(index["preprocessing"]),
        spec,
    )
    save_checkpoint(paths.head, card, head.state_dict(), params=asdict(cfg) | {"lr": facts["lr"]})
    write_curves(paths.head_curves, history)
    metrics = {
        **facts,
        "seconds": round(time.perf_counter() - started, 2),
        "train_samples": len(train.y),
    }
    write_json_atomic(paths.metrics_file("train_head"), metrics)
    log.info(
        "train_head: val acc %.4f at epoch %d (lr %.2g)",
        facts["val_acc"],
        facts["best_epoch"],
        facts["lr"],
    )
    return metrics


def main(params: Params) -> dict:
    return run(params.paths, params.head)
