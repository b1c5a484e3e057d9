"""Recipe probe for the `quick` preset: cache a model's frozen blocks once, then try several ways of
training what follows on the same cache (head warm-up or not, learning rate, epochs).

    .venv/bin/python bench/quick_recipe.py efficientnet_lite0 --size 128 --freeze 11 \
        --variant "epochs=2,lr=1e-3" --variant "head_epochs=5,epochs=2,lr=3e-4"

Data: the quick split (4,500 / 500 / 1,000, stratified, seed 0). It uses the training loop's own
pieces (`ModelInputs` for the cache with mirror images, `fit_head` for LP-FT, `make_optimizer`,
`make_scheduler`, bf16 where the CPU has it); test accuracy is read through the cut's tail on the
cached test images, which equals the whole model's forward (tests/test_transfer.py). It prints one
line per variant (val and test accuracy with a 95 % normal interval, seconds); the figures in
BENCHMARKS.md's "make run: one factor at a time" table come from it and from `xtl run` itself.
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from xtl.config import RunConfig, preset
from xtl.data import load_split
from xtl.io import parse_yaml_scalar
from xtl.models import build_model
from xtl.models.trunk import split_model
from xtl.runs import model_preprocess, split_spec
from xtl.train.loop import ModelInputs, fed_from_cache, fit_head, make_fabric, make_optimizer, make_scheduler, set_bn_momentum


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--size", type=int, required=True)
    parser.add_argument("--freeze", type=int, required=True, help="frozen blocks")
    parser.add_argument("--variant", action="append", required=True, help="KEY=VALUE,... RunConfig keys")
    parser.add_argument("--no-flips", action="store_true", help="cache no mirror images")
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU has it), 32-true, bf16-mixed")
    args = parser.parse_args()

    config = preset("quick", args.model, input_size=args.size, freeze_blocks=args.freeze, augment=not args.no_flips,
                    precision=args.precision)
    split = load_split(config.source, split_spec(config))
    fabric = make_fabric(config)
    torch.manual_seed(config.seed)
    model, spec = build_model(config.model, split.n_classes, input_size=args.size)
    if config.bn_momentum is not None:
        set_bn_momentum(model, config.bn_momentum)
    parts = split_model(model, args.freeze)
    parts.freeze()
    inputs = {name: ModelInputs(split[name], model_preprocess(config)) for name in ("train", "val", "test")}
    started = time.perf_counter()
    for name, feed in inputs.items():
        feed.cache(fabric, parts, config, flips=name == "train" and config.augment)
    print(f"{args.model} {args.size} px, {args.freeze} frozen blocks, precision {fabric._precision.precision}: "
          f"cached {sum(len(f) for f in inputs.values())} images{' + mirrors' if config.augment else ''} "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    initial = copy.deepcopy(model.state_dict())
    for text in args.variant:
        changes = {k: parse_yaml_scalar(v) for k, v in (item.split("=", 1) for item in text.split(","))}
        variant = RunConfig.from_dict({**config.to_dict(), **changes}, where="option --variant")
        model.load_state_dict(initial)
        print(run_variant(fabric, model, spec.classifier, parts, inputs, variant, text), flush=True)


def run_variant(fabric, model, classifier, parts, inputs, config, text: str) -> str:
    started = time.perf_counter()
    if config.head_epochs:  # on the cached outputs, as finetune() does
        fit_head(fabric, model, classifier, parts, {k: inputs[k] for k in ("train", "val")}, config)
    with fed_from_cache(model, parts):
        optimizer = make_optimizer(model, config)
        steps = math.ceil(len(inputs["train"]) / config.batch_size)
        scheduler = make_scheduler(optimizer, config, steps)
        generator = torch.Generator().manual_seed(config.seed)
        for _ in range(config.epochs):
            model.train()
            parts.freeze()
            order = torch.randperm(len(inputs["train"]), generator=generator)
            for step in range(steps):
                idx = order[step * config.batch_size : (step + 1) * config.batch_size]
                with fabric.autocast():
                    logits = model(inputs["train"](idx, fabric.device, augment=config.augment, generator=generator))
                    loss = F.cross_entropy(logits.float(), inputs["train"].part.labels[idx],
                                           label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
        accuracy = {name: _accuracy(fabric, model, inputs[name]) for name in ("val", "test")}
    p, n = accuracy["test"], len(inputs["test"])
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    return (f"  {text}: val {accuracy['val']:.3f} | test {p:.3f} [{p - half:.3f}, {p + half:.3f}] | "
            f"{time.perf_counter() - started:.1f} s")


@torch.no_grad()
def _accuracy(fabric, model, feed: ModelInputs) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(feed), 256):
        idx = torch.arange(start, min(start + 256, len(feed)))
        with fabric.autocast():
            correct += (model(feed(idx, fabric.device)).argmax(1) == feed.part.labels[idx]).sum().item()
    return correct / len(feed)


if __name__ == "__main__":
    main()
