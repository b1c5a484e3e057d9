"""Fine-tuning with Lightning Fabric: one code path for CPU, one GPU, DDP and multi-node."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xtl.config import RunConfig
from xtl.data import Preprocess, Split
from xtl.data.stream import consecutive_batches, image_batches
from xtl.device import check_training_hardware, resolve_device
from xtl.errors import XtlError, gpu_out_of_memory, interrupts_deferred, sigterm_as_interrupt
from xtl.io import atomic_path, write_csv
from xtl.models import build_model, native_bf16, submodule
from xtl.models.trunk import TrunkSplit, split_model
from xtl.runs import RunDir, improves, model_preprocess
from xtl.train.progress import TrainProgress


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: enough to continue exactly."""

    epoch: int = 0  # epochs finished
    best_val_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    batches: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    head: dict[str, Any] = field(default_factory=dict)  # the head-only phase (LP-FT), once it ran


def resolve_precision(config: RunConfig) -> tuple[str, str]:
    """(accelerator, precision) that `auto` stands for on this machine: bf16-mixed where the device
    computes bf16 natively (a GPU; a CPU with AMX or AVX512-BF16), 32-true elsewhere."""
    accelerator = config.accelerator
    if accelerator == "auto":
        accelerator = resolve_device(accelerator="auto").type
    precision = config.precision
    if precision == "auto":
        precision = "bf16-mixed" if native_bf16(accelerator) else "32-true"
    return accelerator, precision


def make_fabric(config: RunConfig):
    from lightning.fabric import Fabric

    accelerator, precision = resolve_precision(config)
    check_training_hardware(accelerator, config.devices, config.num_nodes)  # beyond the machine: a hang
    multi = config.devices > 1 or config.num_nodes > 1
    # Lightning announces "Using bfloat16 Automatic Mixed Precision (AMP)" on stderr; the run records
    # its precision in config.yaml instead (and a one-line error must stay one line)
    from lightning_utilities.core import rank_zero

    rank_zero.log.setLevel(logging.WARNING)  # the logger Lightning's packages last installed there
    try:
        return Fabric(
            accelerator=accelerator, devices=config.devices, num_nodes=config.num_nodes,
            strategy="ddp" if multi else "auto", precision=precision,
        )
    except (ValueError, RuntimeError) as err:  # Lightning's own refusals of a combination
        raise XtlError(f"options --accelerator {accelerator} --devices {config.devices} --num-nodes {config.num_nodes} "
                       f"--precision {precision}: {str(err).splitlines()[0]}") from None


def finetune(config: RunConfig, split: Split, run: RunDir, resume: bool = False, progress: bool = True,
             frozen_cache: dict | None = None) -> TrainState:
    """Fine-tune `config.model` on `split`, keeping the best model (lowest val loss) in `run`.

    `frozen_cache`: a dict the caller keeps between calls, in which the frozen blocks' outputs
    (`cache_frozen`) are kept and found again by what they depend on (the model, its weights, input
    size, normalisation, frozen blocks, precision, the images and flips): fine-tuning seeds of one
    model on one split compute them once. None: computed for this call alone."""
    check_split(split)
    if config.shuffle_labels:
        split = shuffled_labels(split, config.seed)
    fabric = make_fabric(config)
    fabric.launch()
    if len(split["train"]) < fabric.world_size:
        raise XtlError(f"option --train-size: {len(split['train'])} training image(s) for {fabric.world_size} "
                       "devices; give at least one per device")
    fabric.seed_everything(config.seed, verbose=False)
    model, spec = build_model(
        config.model, split.n_classes, pretrained=config.pretrained, weights=config.weights, input_size=config.input_size
    )
    if config.bn_momentum is not None:
        set_bn_momentum(model, config.bn_momentum)
    parts = split_model(model, config.freeze_blocks) if config.freeze_blocks else None
    if parts is not None:
        parts.freeze()
    if fabric.is_global_zero:
        accelerator, precision = resolve_precision(config)
        run.write_config(config, split, spec, precision=precision, accelerator=accelerator)
        split.save_ids(run.file("split.csv"))
    preprocess = model_preprocess(config)
    optimizer = make_optimizer(model, config)
    steps_per_epoch = epoch_batches(len(split["train"]), config.batch_size, fabric.world_size)[1]
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    state = TrainState()
    if resume and run.last_checkpoint.is_file():
        state = load_checkpoint(run.last_checkpoint, model, optimizer, scheduler)
        fabric.print(f"resuming {run.path} after epoch {state.epoch}")
    inputs = {name: ModelInputs(split[name], preprocess) for name in ("train", "val")}
    if parts is not None and config.cache_frozen and state.epoch < config.epochs:
        model.to(fabric.device)
        for name, feed in inputs.items():
            started = time.perf_counter()
            flips = name == "train" and config.augment
            key = _cache_key(config, split, name, flips, fabric) if frozen_cache is not None else None
            if key is not None and key in frozen_cache:
                feed.cached, feed.flipped = frozen_cache[key]
                fabric.print(f"the {config.freeze_blocks} frozen blocks' outputs of {len(split[name])} {name} images "
                             "computed for an earlier run: reused")
                continue
            feed.cache(fabric, parts, config, flips=flips)
            if key is not None:
                frozen_cache[key] = (feed.cached, feed.flipped)
            fabric.print(f"cached the {config.freeze_blocks} frozen blocks' outputs of {len(split[name])} {name} images"
                         f"{' and their mirror images' if feed.flipped is not None else ''} "
                         f"({time.perf_counter() - started:.1f} s)")
    if config.head_epochs and not state.head and state.epoch == 0:
        model.to(fabric.device)
        state.head = fit_head(fabric, model, spec.classifier, parts, inputs, config)
        fabric.print(f"head warm-up (LP-FT): {config.head_epochs} epochs on pooled features: train acc "
                     f"{state.head['train_accuracy']:.4f} | val loss {state.head['val_loss']:.4f} acc "
                     f"{state.head['val_accuracy']:.4f} ({state.head['seconds']:.1f} s)")
    with fed_from_cache(model, parts if inputs["train"].cached is not None else None):
        return _train_epochs(fabric, model, optimizer, scheduler, inputs, config, state, run, parts, progress)


def shuffled_labels(split: Split, seed: int) -> Split:
    """`split` with the training and validation labels permuted within each part (a generator seeded
    by `seed`, so class counts stay): the data-randomisation check's training data. The test part,
    and `split` itself, are left as they are."""
    from dataclasses import replace

    parts = dict(split.parts)
    for k, name in enumerate(("train", "val")):
        part = parts[name]
        order = torch.randperm(len(part), generator=torch.Generator().manual_seed(seed * 1000 + 7 + k))
        parts[name] = replace(part, labels=part.labels[order].clone())
    return replace(split, parts=parts)


def _cache_key(config: RunConfig, split: Split, name: str, flips: bool, fabric) -> str:
    """What the frozen blocks' outputs of one split part depend on: the seed only for a randomly
    initialised model (whose frozen blocks the seed draws); pretrained frozen blocks keep their
    weights, and the cache is computed in eval mode."""
    import hashlib

    ids = hashlib.sha256(np.ascontiguousarray(split[name].ids, dtype=np.int64).tobytes()).hexdigest()
    drawn = None if (config.pretrained or config.weights) else config.seed
    return repr((config.model, config.weights, config.pretrained, drawn, config.input_size, config.normalization,
                 config.freeze_blocks, str(fabric._precision.precision), str(fabric.device), config.source,
                 name, flips, ids))


def _train_epochs(fabric, model, optimizer, scheduler, inputs, config, state, run, parts, progress) -> TrainState:
    if config.compile:
        model = torch.compile(model)
    model, optimizer = fabric.setup(model, optimizer)

    bar = TrainProgress(enabled=progress and fabric.is_global_zero)
    # SIGTERM unwinds like Ctrl-C: the epoch in progress is dropped, finished ones stay for --resume.
    # The message counts the epochs the checkpoint on disk holds (what --resume continues from).
    on_disk = {"epochs": state.epoch}

    def kept() -> str | None:
        return (f"{on_disk['epochs']} finished epoch(s) kept in {run.path}; `xtl finetune --resume` (or the same "
                "`xtl run`) continues" if fabric.is_global_zero else None)

    with bar, sigterm_as_interrupt(kept), out_of_memory_message(config, run, state):
        for epoch in range(state.epoch, config.epochs):
            if state.stopped_early:
                break
            # Seeding per epoch makes a resumed run draw the same batches and augmentations.
            torch.manual_seed(config.seed * 1000 + epoch)
            started = time.perf_counter()
            train_loss, train_acc = train_one_epoch(
                fabric, model, optimizer, scheduler, inputs["train"], config, epoch, state, bar, run, parts
            )
            val_loss, val_acc = validate(fabric, model, inputs["val"], config)
            state.epochs.append({
                "epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val_loss, "val_accuracy": val_acc, "lr": optimizer.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 2),
            })
            fabric.print(
                f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f} acc {train_acc:.4f} | "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}"
            )
            improved = improves(val_loss, state.best_val_loss)
            if improved:
                state.best_val_loss, state.best_epoch, state.epochs_without_improvement = val_loss, epoch + 1, 0
            else:
                state.epochs_without_improvement += 1
            if config.patience and state.epochs_without_improvement >= config.patience:
                state.stopped_early = True
                fabric.print(f"early stop: val loss has not improved for {config.patience} epochs")
            state.epoch = epoch + 1
            if fabric.is_global_zero:
                raw = _unwrap(model)
                with interrupts_deferred():  # an interrupt now waits for the epoch's files (a second one does not)
                    if improved:
                        save_weights(raw, run.weights_path, epoch=state.best_epoch)
                    save_checkpoint(run.last_checkpoint, raw, optimizer, scheduler, state)
                    on_disk["epochs"] = state.epoch
                    write_history(run, state)
            fabric.barrier()
    return state


class ModelInputs:
    """What the model is fed for a batch of one split part: its images preprocessed on the device,
    or, once `cache` ran, the frozen blocks' outputs computed once per image (and per mirror image,
    for training with augmentation: flips are then the only augmentation)."""

    def __init__(self, part, preprocess: Preprocess) -> None:
        self.part, self.preprocess = part, preprocess
        self.cached: torch.Tensor | None = None
        self.flipped: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.part)

    @torch.no_grad()
    def cache(self, fabric, parts: TrunkSplit, config: RunConfig, flips: bool) -> None:
        # bf16 training keeps the cache in bf16 (half the memory; the tail computes in bf16 anyway)
        dtype = torch.bfloat16 if "bf16" in str(fabric._precision.precision) else torch.float32
        outputs: list[list[torch.Tensor]] = [[], []]
        for images in image_batches(self.part.images, consecutive_batches(len(self.part), config.eval_batch_size)):
            x = self.preprocess(images.to(fabric.device))
            for kept, images in zip(outputs, (x, x.flip(-1)) if flips else (x,)):
                with fabric.autocast():
                    kept.append(parts.trunk(images.contiguous(memory_format=torch.channels_last)).to(dtype))
        self.cached = torch.cat(outputs[0])
        self.flipped = torch.cat(outputs[1]) if flips else None

    def __call__(self, idx: torch.Tensor, device, augment: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if self.cached is None:
            images = self.part.images[idx].to(device, non_blocking=True)
            return self.preprocess(images, augment=augment, generator=generator)
        return self._from_cache(idx, augment, generator)

    def _from_cache(self, idx: torch.Tensor, augment: bool, generator: torch.Generator | None) -> torch.Tensor:
        x = self.cached[idx]
        if augment and self.flipped is not None:
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, *[1] * (x.ndim - 1)), self.flipped[idx], x)
        return x

    def batches(self, batches: list[torch.Tensor], device, augment: bool = False,
                generator: torch.Generator | None = None):
        """(positions, model input) of each batch of positions, in order: the same inputs as calling this
        object batch by batch (the same random numbers drawn from `generator`, in the same order), with a
        streamed part's images decoded ahead in worker processes (`xtl.data.stream`)."""
        if self.cached is not None:
            for idx in batches:
                yield idx, self._from_cache(idx, augment, generator)
            return
        for idx, images in zip(batches, image_batches(self.part.images, batches)):
            yield idx, self.preprocess(images.to(device, non_blocking=True), augment=augment, generator=generator)


class fed_from_cache:
    """While active, `model(x)` takes the frozen blocks' outputs (the cut's tail) instead of images;
    the model's own forward is restored on exit, also after an error."""

    def __init__(self, model: nn.Module, parts: TrunkSplit | None) -> None:
        self.model, self.parts = model, parts

    def __enter__(self) -> None:
        if self.parts is not None:
            self.model.forward = self.parts.tail

    def __exit__(self, *exc) -> None:
        if self.parts is not None:
            del self.model.forward


def fit_head(fabric, model: nn.Module, classifier: str, parts: TrunkSplit | None, inputs: dict[str, ModelInputs],
             config: RunConfig) -> dict[str, Any]:
    """LP-FT's first phase (Kumar et al. 2022): train only the new head, on the pooled features of
    the pretrained (or frozen-then-cached) network computed once per image in eval mode, for
    `config.head_epochs` epochs of AdamW at `config.head_lr`. Every other weight is untouched."""
    started = time.perf_counter()
    head = submodule(model, classifier)
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float()))
    model.eval()
    try:
        with torch.no_grad(), fed_from_cache(model, parts if inputs["train"].cached is not None else None):
            for name, feed in inputs.items():
                captured.clear()
                chunks = [torch.arange(start, min(start + config.eval_batch_size, len(feed.part)))
                          for start in range(0, len(feed.part), config.eval_batch_size)]
                for _, x in feed.batches(chunks, fabric.device):
                    with fabric.autocast():
                        model(x)
                features[name] = (torch.cat(captured), feed.part.labels.to(fabric.device))
    finally:
        hook.remove()
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.head_lr, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed * 1000 - 1)
    x, y = features["train"]
    for _ in range(config.head_epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), config.batch_size):
            idx = order[start : start + config.batch_size].to(x.device)
            loss = F.cross_entropy(head(x[idx]), y[idx], label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        train_acc = (head(x).argmax(1) == y).float().mean().item()
        vx, vy = features["val"]
        logits = head(vx)
        val_loss = F.cross_entropy(logits, vy).item() if len(vy) else float("nan")
        val_acc = (logits.argmax(1) == vy).float().mean().item() if len(vy) else float("nan")
    return {"epochs": config.head_epochs, "lr": config.head_lr, "train_accuracy": train_acc, "val_loss": val_loss,
            "val_accuracy": val_acc, "seconds": round(time.perf_counter() - started, 2)}


def out_of_memory_message(config: RunConfig, run: RunDir, state: TrainState):
    """GPU out of memory -> one line suggesting a smaller batch (the finished epochs stay on disk)."""
    return gpu_out_of_memory(lambda: (
        f"out of GPU memory in epoch {state.epoch + 1} with --batch-size {config.batch_size} per device; "
        f"try a smaller --batch-size, e.g. {max(1, config.batch_size // 2)} (epochs finished so far are kept in {run.path})"
    ))


def train_one_epoch(fabric, model, optimizer, scheduler, train: "ModelInputs", config, epoch, state, bar, run,
                    parts: TrunkSplit | None = None):
    model.train()
    if parts is not None:
        parts.freeze()  # the frozen blocks keep their BatchNorm statistics
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(len(train), generator=generator)
    per_device, n_batches = epoch_batches(len(train), config.batch_size, fabric.world_size)
    order = order[fabric.global_rank :: fabric.world_size][:per_device]
    bar.start_epoch(epoch + 1, config.epochs, n_batches)
    readout = StepReadout(epoch, state, bar, fabric.world_size, run)
    batches = [order[step * config.batch_size : (step + 1) * config.batch_size] for step in range(n_batches)]
    for step, (idx, x) in enumerate(train.batches(batches, fabric.device, augment=config.augment, generator=generator)):
        labels = train.part.labels[idx].to(fabric.device, non_blocking=True)
        with fabric.autocast(), one_image_batches(config, len(idx)):
            logits = model(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        fabric.backward(loss)
        if config.grad_clip:
            # a non-finite loss is reported by StepReadout, one step later, with the run's message
            fabric.clip_gradients(model, optimizer, max_norm=config.grad_clip, error_if_nonfinite=False)
        optimizer.step()
        scheduler.step()
        readout.push(step, loss, logits, labels, optimizer.param_groups[0]["lr"])
    readout.flush()
    sums = fabric.all_reduce(torch.tensor(readout.totals, device=fabric.device), reduce_op="sum")
    return (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()


def check_split(split: Split) -> None:
    """Data no classifier can be trained and evaluated on, refused before any work, naming the option
    that cut it: one class, or an empty training, validation or test split."""
    names = split.class_names
    if len(names) < 2:
        raise XtlError(f"option --source: data source {split.source} has {len(names)} class"
                       f"{'' if len(names) == 1 else 'es'} ({', '.join(names)}); a classifier needs at least 2")
    for part, word, option, why in (
        ("train", "training", "--train-size", "nothing would train"),
        ("val", "validation", "--val-size", "validation picks the best epoch"),  # e.g. 10 % of a tiny pool rounds to none
        ("test", "test", "--test-size", "the best model is evaluated on it"),
    ):
        if len(split[part]) == 0:
            raise XtlError(f"option {option}: the {word} split of {split.source} is empty; {why}, so give {option} "
                           "1 or more")


def epoch_batches(n_images: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(images, batches) per device of a training epoch. Every device takes as many images (a DDP step
    waits for all of them), and a last batch of a single image is left out: BatchNorm cannot train on
    one image where a layer's output is 1 x 1 (a different image each epoch: the order is reshuffled)."""
    per_device = n_images // world_size
    if batch_size > 1 and per_device > 1 and per_device % batch_size == 1:
        per_device -= 1
    return per_device, math.ceil(per_device / batch_size)


class one_image_batches:
    """BatchNorm's error on a batch of one image (one value per channel) as one line naming the option:
    `--batch-size 1`, or a training split of one image per device."""

    def __init__(self, config: RunConfig, n: int) -> None:
        self.config, self.n = config, n

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, err, tb) -> bool:
        if kind is ValueError and "Expected more than 1 value per channel" in str(err):
            option = (f"--batch-size {self.config.batch_size}" if self.config.batch_size == 1
                      else "--train-size: one training image per device")
            raise XtlError(f"option {option}: a BatchNorm layer of {self.config.model} sees one value per channel "
                           f"in a batch of {self.n} image and cannot train on it; give --batch-size 2 or more (or a "
                           "larger --input-size)") from None
        return False


class StepReadout:
    """Per-step loss and accuracy for the history, the progress bar and the non-finite-loss check,
    read back one step late: the host queues step k + 1 before it waits for step k's numbers, so a
    GPU never idles on the read-back (an eager `.item()` per step stalls it once per step)."""

    def __init__(self, epoch: int, state: TrainState, bar: TrainProgress, world_size: int, run: RunDir) -> None:
        self.epoch, self.state, self.bar, self.world_size, self.run = epoch, state, bar, world_size, run
        self.pending: tuple[int, torch.Tensor, int, float, float] | None = None
        self.totals = [0.0, 0.0, 0.0]  # loss sum, correct, seen
        self.last_queued = time.perf_counter()

    def push(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lr: float) -> None:
        stats = torch.stack([loss.detach().float(), (logits.detach().argmax(1) == labels).sum().float()])
        self.flush()
        # A step's time runs from the previous step's push to its own: after the read-back above, the
        # device has finished step k - 1, so in steady state this is one step's time on the device too
        # (timing the read-back itself gave the last step of an epoch ~0 s, i.e. 100,000 images/s).
        now = time.perf_counter()
        seconds, self.last_queued = now - self.last_queued, now
        self.pending = (step, stats, len(labels), lr, seconds)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, stats, n, lr, seconds = self.pending
        self.pending = None
        loss, correct = stats.tolist()
        if not math.isfinite(loss):
            kept = (f"the last good checkpoint is kept in {self.run.path}" if self.state.epoch
                    else "no epoch had finished, so no checkpoint is kept")
            raise XtlError(f"training loss became {loss} at epoch {self.epoch + 1}, batch {step + 1}; {kept}; try a lower --lr")
        images_per_s = n * self.world_size / max(seconds, 1e-9)
        self.totals = [self.totals[0] + loss * n, self.totals[1] + correct, self.totals[2] + n]
        self.state.batches.append({
            "epoch": self.epoch + 1, "step": len(self.state.batches) + 1, "loss": round(loss, 6),
            "accuracy": round(correct / n, 6), "lr": lr, "images_per_s": round(images_per_s, 2),
        })
        self.bar.advance(loss, correct / n, images_per_s)


@torch.no_grad()
def validate(fabric, model, feed: "ModelInputs", config: RunConfig) -> tuple[float, float]:
    model.eval()
    positions = torch.arange(len(feed.part))[fabric.global_rank :: fabric.world_size]
    total = torch.zeros(3, device=fabric.device)
    chunks = [positions[start : start + config.eval_batch_size] for start in range(0, len(positions), config.eval_batch_size)]
    for idx, x in feed.batches(chunks, fabric.device):
        labels = feed.part.labels[idx].to(fabric.device)
        with fabric.autocast():
            logits = model(x)
        total += torch.stack([
            F.cross_entropy(logits.float(), labels, reduction="sum"),
            (logits.argmax(1) == labels).sum().float(),
            torch.tensor(float(len(idx)), device=fabric.device),
        ])
    total = fabric.all_reduce(total, reduce_op="sum")
    if total[2] == 0:
        return float("nan"), float("nan")
    return (total[0] / total[2]).item(), (total[1] / total[2]).item()


# ----------------------------------------------------------------------------- optimiser and schedule


def make_optimizer(model: nn.Module, config: RunConfig) -> torch.optim.Optimizer:
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]  # frozen blocks excluded
    if config.optimizer == "adam":  # the paper's: L2 penalty through the gradient
        return torch.optim.Adam([p for _, p in trainable], lr=config.lr, weight_decay=config.weight_decay)
    decay, no_decay = [], []
    for name, param in trainable:
        # Norm scales, biases, tokens and position embeddings are not shrunk (standard for AdamW).
        (no_decay if param.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "reg_token")) else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr)


def make_scheduler(optimizer, config: RunConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum


# ----------------------------------------------------------------------------- files


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model under Fabric's wrapper and torch.compile's, so that saved keys never change."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_weights(model: nn.Module, path: Path, epoch: int | None = None) -> None:
    """The model's tensors; `epoch`, the epoch they are from, goes in the file's metadata (`RunDir.best_epoch`)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"epoch": str(epoch)} if epoch is not None else None)


def save_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, state: TrainState) -> None:
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "state": state.__dict__,
    }
    # through a Python file object, so a full disk surfaces as an OSError (not a bare RuntimeError)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: Path, model: nn.Module, optimizer, scheduler) -> TrainState:
    """Resume from `path`. Read with `weights_only=True`: a checkpoint holds tensors and plain values
    only, so a run folder from someone else cannot run code here; a file that needs more is refused
    in one line."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        return TrainState(**payload["state"])
    except Exception as err:
        raise XtlError(f"checkpoint {path} cannot be resumed: {type(err).__name__}: {str(err).splitlines()[0]}") from None


def write_history(run: RunDir, state: TrainState) -> None:
    write_csv(run.file("history_batches.csv"), state.batches)
    write_csv(run.file("history_epochs.csv"), state.epochs)
