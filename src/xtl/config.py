"""The one configuration of a fine-tuning run, with presets, validated by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from xtl.errors import XtlError


# Settings that change how fast a model trains and is evaluated, not what it learns: `xtl run`
# retrains nothing when only these change.
SPEED_ONLY = ("compile", "eval_batch_size")


@dataclass
class RunConfig:
    """Everything needed to rebuild the split and the model and to train it again."""

    # model
    model: str = "efficientnet_lite0"
    weights: str | None = None  # local weights file instead of the hub
    pretrained: bool = True
    input_size: int | None = None  # None: the model's own
    normalization: str = "model"  # "model": pretrained mean/std; "paper": 0.5/0.5
    bn_momentum: float | None = None  # override BatchNorm momentum (PyTorch convention)
    # data
    source: str = "../shared/data/cifar10"
    split: str = "paper"
    train_size: int | None = None
    val_size: int | None = None
    test_size: int | None = None
    stratified: bool = False
    seed: int = 0
    # optimisation
    optimizer: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.05
    batch_size: int = 64
    epochs: int = 10
    schedule: str = "cosine"  # cosine | constant
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    augment: bool = True
    grad_clip: float | None = 1.0
    patience: int = 3  # early stopping on val loss; 0 = off
    # transfer: what trains, and on what
    freeze_blocks: int = 0  # the first N blocks (and the stem) keep their pretrained weights; 0 = all train
    cache_frozen: bool = True  # with freeze_blocks: compute the frozen blocks once per image (augmentation: flips only)
    head_epochs: int = 0  # LP-FT: epochs of head-only training on pooled features before fine-tuning (Kumar et al. 2022)
    head_lr: float = 1e-3  # learning rate of that head-only phase
    # hardware
    accelerator: str = "auto"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "auto"  # auto = bf16-mixed on a GPU and on CPUs with native bf16 (AMX, AVX512-BF16), else 32-true
    compile: bool = False  # torch.compile the model (worth it on a GPU, for runs longer than the compilation)
    eval_batch_size: int = 128
    # provenance, filled in by the run
    preset: str = "default"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "option") -> None:
        """Types, choices and ranges; `where` is "option" (CLI) or the config file the values came from."""
        check_types(self, where)

        def key(name: str) -> str:
            return label(name, where)

        choices = {
            "normalization": ("model", "paper"),
            "split": ("paper", "random"),
            "optimizer": ("adam", "adamw"),
            "schedule": ("cosine", "constant"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise XtlError(f"{key(name)} must be one of {', '.join(allowed)}, not '{getattr(self, name)}'")
        positive = ("lr", "head_lr", "batch_size", "epochs", "devices", "num_nodes", "eval_batch_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise XtlError(f"{key(name)} must be > 0, not {getattr(self, name)}")
        for name in ("weight_decay", "warmup_epochs", "label_smoothing", "patience", "freeze_blocks", "head_epochs"):
            if getattr(self, name) < 0:
                raise XtlError(f"{key(name)} must be >= 0, not {getattr(self, name)}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise XtlError(f"{key('grad_clip')} must be >= 0 (0: no clipping), not {self.grad_clip}")
        if not 0 <= self.label_smoothing < 1:
            raise XtlError(f"{key('label_smoothing')} must be in [0, 1), not {self.label_smoothing}")
        if self.split == "random" and self.val_size is not None and self.val_size < 1:
            raise XtlError(f"{key('val_size')} must be >= 1 (validation picks the best epoch), not {self.val_size}")
        if self.input_size is not None and self.input_size < 16:
            raise XtlError(f"{key('input_size')} must be >= 16, not {self.input_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learning_settings(self) -> dict[str, Any]:
        """The settings that decide what the model learns: all but those that only change the speed."""
        return {k: v for k, v in self.to_dict().items() if k not in SPEED_ONLY}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise XtlError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        config = cls.__new__(cls)
        config.__dict__.update(cls().__dict__)
        config.__dict__.update(data)
        config.validate(where)
        return config


def check_types(obj: Any, where: str = "option") -> None:
    """Every field of the dataclass `obj` holds a value of its annotated type (ints pass as floats)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        value = getattr(obj, f.name)
        if not _fits(value, hints[f.name]):
            raise XtlError(f"{label(f.name, where)} must be {_type_name(hints[f.name])}, not {value!r}")


def label(name: str, where: str) -> str:
    """How an error names a setting: `option --batch-size` on the CLI, `FILE: key 'batch_size'` in a file."""
    return f"option --{name.replace('_', '-')}" if where == "option" else f"{where}: key '{name}'"


def _fits(value: Any, hint: Any) -> bool:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        named = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is dict:
        return "a mapping"
    if origin in (list, tuple):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}.get(hint, str(hint))


# The quick recipe's frozen blocks for the models it was measured on (BENCHMARKS.md); other models
# fine-tune whole under it, since xtl cannot know where a model's early, generic layers end.
QUICK_FROZEN_BLOCKS = {"efficientnet_lite0": 11, "vit_s14_dinov2": 6}


def _is_vit(model: str) -> bool:
    from xtl.models import get_spec

    return get_spec(model).family == "vit"


def preset(name: str, model: str, **overrides: Any) -> RunConfig:
    """A named recipe for `model`; `overrides` (None values ignored) win over it.

    - `paper`: the paper's protocol exactly (Adam, paper split, 0.5/0.5 normalisation, no
      augmentation, constant lr; ResNet/CNN lr 1e-5 wd 5e-4 5 epochs; ViT lr 2e-5 wd 0.01
      batch 32 3 epochs).
    - `default`: our recipe for the paper split on a GPU (AdamW, warm-up + cosine, flips and
      shifts, label smoothing, early stopping); see BENCHMARKS.md.
    - `quick`: for `make run` on a 2-core CPU: 4,500 / 500 / 1,000 stratified images, the first
      blocks frozen and their outputs computed once per image (`QUICK_FROZEN_BLOCKS`; flips are the
      only augmentation then), the rest fine-tuned for 2 epochs, bf16 where the CPU has it.
      BENCHMARKS.md has the one-factor-at-a-time table that chose it.
    """
    vit = _is_vit(model)
    if name == "paper":
        base = dict(
            optimizer="adam", normalization="paper", augment=False, schedule="constant", warmup_epochs=0.0,
            label_smoothing=0.0, grad_clip=None, patience=0, split="paper", batch_size=32,
            lr=2e-5 if vit else 1e-5, weight_decay=0.01 if vit else 5e-4, epochs=3 if vit else 5,
        )
    elif name in ("default", "quick"):
        base = dict(
            optimizer="adamw", lr=5e-5 if vit else 5e-4, weight_decay=0.05, batch_size=64,
            epochs=10, warmup_epochs=1.0, schedule="cosine", label_smoothing=0.1, augment=True, patience=3,
            # TF-ported CNNs (EfficientNet-Lite) carry momentum 0.01: running statistics then lag
            # far behind the fine-tuned weights; PyTorch's usual 0.1 keeps them in step.
            bn_momentum=None if vit else 0.1,
        )
        if name == "quick":
            base.update(
                split="random", stratified=True, train_size=4500, val_size=500,
                test_size=1000, input_size=112 if vit else 128, epochs=2,
                warmup_epochs=0.3, batch_size=64, lr=1e-4 if vit else 1e-3, patience=0,
                freeze_blocks=QUICK_FROZEN_BLOCKS.get(model, 0),
            )
    else:
        raise XtlError(f"option --preset must be one of paper, default, quick, not '{name}'")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(model=model, preset=name, **base)
