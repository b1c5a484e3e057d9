"""Explanations per second, per method and model (batched), and our batched Chefer transformer
attribution against the same computation looped one image at a time (batch 1, as the authors'
code runs it), with the largest difference between the two.

    .venv/bin/python bench/explain_throughput.py [--device cuda] [--models resnet34 vit_b16_in21k]
        [--size 224] [--batch 64] [--methods gradcam attention_rollout] [--random-init]
        [--chefer-images 16] [--float64] [--matmul-precision high] [--json FILE] [--markdown FILE]

Images are CIFAR-10 test-like JPEGs from `device_payload/` or ../shared (resized and normalised
on the device as our runner does); the class explained is the model's prediction, computed once
beforehand (as the runner reuses the evaluation's predictions), so each call is one explanation.
Methods marked slow (Score-CAM, integrated gradients, SmoothGrad: many passes per image) get
`--slow-batch` images. Timings: median of `--repeats` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch

from common import header, markdown_table, median, save, timed, uint8_images
from xtl.config import preset
from xtl.errors import XtlError
from xtl.explain import explain, methods_for
from xtl.models import build_model
from xtl.runs import model_preprocess

MODELS = ("efficientnet_lite0", "vit_s14_dinov2")
SLOW = {"scorecam", "integrated_gradients", "smoothgrad", "gradient_shap", "occlusion", "kernel_shap", "lime"}  # many passes per image
CHEFER = "transformer_attribution"


def measure(model, images: torch.Tensor, targets: torch.Tensor, method: str, repeats: int, **options) -> float:
    explain(model, images[:2], targets[:2], method=method, **options)  # warm-up
    seconds = [timed(lambda: explain(model, images, targets, method=method, **options), images.device)
               for _ in range(repeats)]
    return len(images) / median(seconds)


def chefer_batched_vs_loop(model, images: torch.Tensor, targets: torch.Tensor, rounds: int,
                           dtype: torch.dtype | None = None) -> dict:
    """One batched call against len(images) batch-1 calls of the same method; rounds alternate."""
    if dtype is not None:  # one converted copy for both, so that neither times the conversion
        model, images = copy.deepcopy(model).to(dtype), images.to(dtype)

    def batched():
        return explain(model, images, targets, method=CHEFER)

    def looped():
        return [explain(model, images[i : i + 1], targets[i : i + 1], method=CHEFER) for i in range(len(images))]

    one, many = batched(), looped()  # warm-up, and the maps compared
    raw = torch.cat([e.raw for e in many])
    maps = torch.cat([e.maps for e in many])
    times = {"batched": [], "loop": []}
    for r in range(rounds):
        for name, run in (("batched", batched), ("loop", looped))[:: 1 if r % 2 == 0 else -1]:
            times[name].append(timed(run, images.device))
    b, l = median(times["batched"]), median(times["loop"])
    return {
        "images": len(images), "dtype": str(dtype or images.dtype).replace("torch.", ""),
        "batched_images_per_s": len(images) / b, "loop_images_per_s": len(images) / l, "speedup": l / b,
        "max_abs_diff_raw": (one.raw - raw).abs().max().item(),
        "max_rel_diff_raw": ((one.raw - raw).abs().max() / raw.abs().max()).item(),
        "max_abs_diff_maps": (one.maps - maps).abs().max().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--size", type=int, default=None, help="input size (default: each model's own)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--slow-batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="*", default=None, help="default: every method of each model's family")
    parser.add_argument("--random-init", action="store_true", help="no pretrained weights (any model, offline)")
    parser.add_argument("--chefer-images", type=int, default=0, help="batched vs batch-1 transformer attribution")
    parser.add_argument("--chefer-rounds", type=int, default=3)
    parser.add_argument("--float64", action="store_true", help="also compare batched vs loop in float64")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high", "medium"],
                        help="torch.set_float32_matmul_precision (high = TF32 on a GPU)")
    parser.add_argument("--no-verify", action="store_true",
                        help="ViT relevance methods without their check forward (verify=False)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    torch.set_float32_matmul_precision(args.matmul_precision)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    pool, _ = uint8_images(max(args.batch, args.chefer_images, 2))
    rows, chefer = [], []
    for name in args.models:
        model, spec = build_model(name, 10, pretrained=not args.random_init, input_size=args.size)
        model.to(args.device).eval()
        images = model_preprocess(preset("default", name, input_size=args.size))(pool.to(args.device))
        with torch.no_grad():
            targets = model(images).argmax(1)
        for method in args.methods or methods_for(spec.family):
            if method not in methods_for(spec.family):
                continue
            n = args.slow_batch if method in SLOW else args.batch
            options = {"verify": False} if args.no_verify and method not in methods_for("cnn") else {}
            try:
                ips = measure(model, images[:n], targets[:n], method, args.repeats, **options)
            except XtlError as err:  # a method refusing this model (e.g. DeepLift on ReLU6): say so, go on
                print(f"  {name} {method}: refused: {err}", flush=True)
                rows.append({"model": name, "method": method, "input": spec.input_size, "batch": n,
                             "images_per_s": float("nan")})
                continue
            rows.append({"model": name, "method": method + (" (verify off)" if options else ""),
                         "input": spec.input_size, "batch": n, "images_per_s": ips})
            print(f"  {name} {method}: {ips:.2f} images/s", flush=True)
        if args.chefer_images and spec.family == "vit":
            n = args.chefer_images
            for dtype in [None] + ([torch.float64] if args.float64 else []):
                result = {"model": name, "input": spec.input_size,
                          **chefer_batched_vs_loop(model, images[:n], targets[:n], args.chefer_rounds, dtype)}
                chefer.append(result)
                print(f"  {name} {CHEFER} batched vs loop: {result}", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
        report(args, rows, chefer)  # after every model, so that a time limit keeps what was measured


def report(args, rows: list[dict], chefer: list[dict]) -> None:
    results = {**header(args.device), "benchmark": "explain_throughput", "matmul_precision": args.matmul_precision,
               "weights": "random init" if args.random_init else "pretrained", "rows": rows, "chefer": chefer}
    head = (f"Explanation throughput, {results['machine']}, {results['date']}, torch {results['torch']}, "
            f"{results['weights']}, float32 matmul precision {args.matmul_precision}\n\n")
    text = head + markdown_table(rows, ["model", "method", "input", "batch", "images_per_s"])
    if chefer:
        text += "\n\nTransformer attribution, one batched call against batch-1 calls:\n\n" + markdown_table(chefer, [
            "model", "input", "images", "dtype", "batched_images_per_s", "loop_images_per_s", "speedup",
            "max_abs_diff_raw", "max_rel_diff_raw", "max_abs_diff_maps"])
    save(results, args.json, text, args.markdown)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
