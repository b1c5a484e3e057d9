"""The one configuration of a fine-tuning run, with presets, validated by name."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from xtl.errors import XtlError
from xtl.settings import MAX_INPUT_SIZE, Rule, check_known, check_settings, check_types, label  # noqa: F401  (check_types, label: re-exported)


# Settings that change how fast a model trains and is evaluated, not what it learns: `xtl run`
# retrains nothing when only these change.
SPEED_ONLY = ("compile", "eval_batch_size", "data_path", "num_workers")


# What each setting may hold beyond its type (xtl.settings); every number must also be finite.
_POSITIVE, _NOT_NEGATIVE = Rule(above=0), Rule(at_least=0)
RULES: dict[str, Rule] = {
    "normalization": Rule(choices=("model", "paper")),
    "split": Rule(choices=("paper", "random")),
    "data_path": Rule(choices=("auto", "memory", "stream")),  # xtl.data.stream.DATA_PATHS
    "num_workers": Rule(at_least=0, note="0: decode in the training process"),
    "optimizer": Rule(choices=("adam", "adamw")),
    "schedule": Rule(choices=("cosine", "constant")),
    **dict.fromkeys(("lr", "head_lr", "batch_size", "epochs", "devices", "num_nodes", "eval_batch_size"), _POSITIVE),
    **dict.fromkeys(("weight_decay", "warmup_epochs", "patience", "freeze_blocks", "head_epochs", "seed",
                     "split_seed", "train_size", "val_size", "test_size"), _NOT_NEGATIVE),
    "grad_clip": Rule(at_least=0, note="0: no clipping"),
    "label_smoothing": Rule(at_least=0, below=1),
    "bn_momentum": Rule(at_least=0, at_most=1),
    "input_size": Rule(at_least=16, at_most=MAX_INPUT_SIZE),
    "precision": Rule(choices=("auto", *("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
                                          "32", "16", "bf16", "64"))),  # PRECISIONS
}
# Lightning Fabric's precisions (a test pins them against Lightning's own list; its transformer-engine
# ones need NVIDIA's package, not installed with xtl), and `auto` (xtl.train.loop.resolve_precision)
PRECISIONS = RULES["precision"].choices


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
    seed: int = 0  # the new head's initialisation and the batch order; the split's too unless split_seed is set
    split_seed: int | None = None  # the split's seed (None: `seed`): fine-tuning seeds that share one split
    data_path: str = "auto"  # memory: decoded once into RAM; stream: decoded per batch; auto: memory if it fits
    num_workers: int = 2  # stream: worker processes that decode the batches
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
    # the data-randomisation sanity check (Adebayo et al. 2018): train on the training and validation
    # labels shuffled (seeded by `seed`; the test labels stay true) - never for a model meant for use
    shuffle_labels: bool = False
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
        """Types, choices and ranges (`RULES`, xtl.settings); `where` is "option" (CLI) or the config
        file the values came from."""
        check_settings(self, RULES, where)
        if self.split == "random" and self.val_size is not None and self.val_size < 1:
            raise XtlError(f"{label('val_size', where)} must be >= 1 (validation picks the best epoch), not {self.val_size}")
        for name, reason in (("train_size", "an empty training split trains nothing"),
                             ("test_size", "the best model is evaluated on it")):
            if getattr(self, name) == 0:
                raise XtlError(f"{label(name, where)} must be >= 1 ({reason}), not 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learning_settings(self) -> dict[str, Any]:
        """The settings that decide what the model learns: all but those that only change the speed."""
        # split_seed None is `seed`'s split, what a run recorded before the key existed trained on
        return {k: v for k, v in self.to_dict().items()
                if k not in SPEED_ONLY and not (k == "split_seed" and v is None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "RunConfig":
        check_known(data, (f.name for f in fields(cls)), where)
        config = cls.__new__(cls)
        config.__dict__.update(cls().__dict__)
        config.__dict__.update(data)
        config.validate(where)
        return config


# The quick recipe's frozen blocks for the models it was measured on (BENCHMARKS.md); other models
# fine-tune whole under it, since xtl cannot know where a model's early, generic layers end.
QUICK_FROZEN_BLOCKS = {"efficientnet_lite0": 11, "vit_s14_dinov2": 6}


def _is_vit(model: str) -> bool:
    from xtl.models import get_spec

    return get_spec(model).family == "vit"


# The recipes `xtl finetune --preset` names; `xtl run`'s presets of the same names (quick, paper)
# fine-tune with these (xtl.pipeline.config.TRAINING_PRESET).
PRESETS = ("paper", "default", "quick")


def preset(name: str, model: str, **overrides: Any) -> RunConfig:
    """A named recipe for `model`; `overrides` (None values ignored) win over it.

    - `paper`: the paper's protocol exactly (Adam, paper split, 0.5/0.5 normalisation, no
      augmentation, constant lr; ResNet/CNN lr 1e-5 wd 5e-4 5 epochs; ViT lr 2e-5 wd 0.01
      batch 32 3 epochs).
    - `default`: our recipe for the paper split on a GPU (AdamW, warm-up + cosine, flips and
      shifts, label smoothing, early stopping); see BENCHMARKS.md.
    - `quick`: for `make run` on a 2-core CPU: 4,500 / 500 / 1,000 stratified images, the first
      blocks frozen and their outputs computed once per image (`QUICK_FROZEN_BLOCKS`; flips are the
      only augmentation then), the rest fine-tuned for at most 6 epochs (CNN: its validation loss
      flattens by then) or 2 (ViT: 150 s an epoch on a 2-core CPU, still improving), early stopping
      after 2 epochs without improvement, bf16 where the CPU has it.
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
                test_size=1000, input_size=112 if vit else 128, epochs=2 if vit else 6,
                warmup_epochs=0.3, batch_size=64, lr=1e-4 if vit else 1e-3, patience=2,
                freeze_blocks=QUICK_FROZEN_BLOCKS.get(model, 0),
            )
    else:
        Rule(choices=PRESETS).check("preset", name, "option")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(model=model, preset=name, **base)
