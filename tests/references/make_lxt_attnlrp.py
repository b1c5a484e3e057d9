"""Make tests/references/lxt_attnlrp.safetensors: LXT 2.1's AttnLRP and CP-LRP on a tiny ViT.

Run from the repository root, in a separate environment (never in the project's .venv: LXT
patches `forward` of global classes such as torch.nn.LayerNorm, and its `lxt.efficient` import
fails with transformers 5):

    python3.11 -m venv /work/lxtenv
    /work/lxtenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/lxtenv/bin/pip install "transformers==4.57.6" safetensors numpy pillow
    /work/lxtenv/bin/pip install --no-deps lxt==2.1
    /work/lxtenv/bin/python tests/references/make_lxt_attnlrp.py

(transformers must be 4.x with Qwen3 and Gemma3, i.e. >= 4.51 and < 5: `lxt.efficient` imports
`transformers.models.qwen3`, `gemma3` and `transformers.modeling_attn_mask_utils`. With 4.46
the import fails on qwen3. zennit, open_clip, accelerate and bitsandbytes are not needed; the
missing zennit only prints a warning, and zennit is used by LXT only for the gamma rule.)

The model: a Hugging Face `ViTForImageClassification`, config in CONFIG below, with
`attn_implementation="sdpa"` (not "eager": transformers' eager ViT attention computes the softmax
in float32 even for a float64 model, which leaves ~1e-7 relative rounding in every number; SDPA
on the CPU stays in float64; LXT wraps both the same way),
built from seed 0 and then re-initialised (see `reinitialise`: every weight random normal scaled
by 1/sqrt(fan_in), every bias, LayerNorm affine, class token and position embedding clearly
non-zero, so that no rule is tested on a degenerate zero), in float64, eval mode.

Which LXT code is used. LXT 2.1 ships no patch map for Hugging Face ViT (its `DEFAULT_MAP` in
`lxt/efficient/models/__init__.py` has llama, qwen2, qwen3, gemma3, bert, gpt2 and torchvision's
`vision_transformer`, and for the latter only CP-LRP: `lxt/efficient/models/vit_torch.py`
`cp_LRP`). Its patch functions are generic, so the maps below are built from LXT's own functions
only, exactly as LXT's `gpt2.attnLRP` / `gpt2.cp_LRP` maps are (the Hugging Face ViT has the same
eager_attention_forward / ALL_ATTENTION_FUNCTIONS structure as GPT-2):

    ATTNLRP = {torch.nn.LayerNorm: partial(patch_method, layer_norm_forward),
               transformers.activations.GELUActivation:
                   partial(patch_method, non_linear_forward, keep_original=True),
               torch.nn.Dropout: partial(patch_method, dropout_forward),
               transformers.models.vit.modeling_vit: patch_attention}
    CP_LRP  = same, with patch_cp_attention instead of patch_attention

all from `lxt.efficient.patches`, applied with `lxt.efficient.monkey_patch(modeling_vit,
patch_map)`. The rules this gives (all "input x modified gradient", no zennit, no gamma):

- Linear layers (q, k, v, attention output, MLP, classifier) and the patch-embedding Conv2d:
  not patched, plain gradient = LRP-0 / epsilon rule with epsilon 0; biases absorb relevance.
- Residual additions, the position-embedding add and the class-token concat: plain gradient.
- LayerNorm (`patches.layer_norm_forward`): y = (x - mean(x)) / std.detach() * w + b with
  std = sqrt(var(x, biased) + ln.eps): the std is a constant, the mean is NOT detached (the
  centring is a linear map), w and b are an affine map (b absorbs).
- GELU (`patches.non_linear_forward` -> `rules.identity_rule_implicit`): identity rule, the
  backward is g_in = g_out * gelu(x) / (x + 1e-10) (epsilon 1e-10 added to x, not sign-aware).
- Attention, AttnLRP (`patches.patch_attention` -> `wrap_attention_forward`): the gradient
  reaching query and key (after their projections and head split, before q.k^T) is divided by 4,
  the gradient reaching value by 2 (`rules.divide_gradient`); everything in between is the plain
  gradient: scores = (q k^T) * head_dim**-0.5, softmax, A v. That is the uniform rule (half to
  each factor) on both matmuls, and on the softmax the plain gradient times its input, which is
  the paper's Proposition 3.1 rule R_s = s * (R_A - A * sum_j R_A,j) at the scaled scores s.
- Attention, CP-LRP (`patches.patch_cp_attention` -> `cp_wrap_attention_forward`): query and
  key are detached (attention probabilities constant), value keeps the full gradient.
- Heatmap as in LXT's examples/vit_torch.py: relevance = x * x.grad on the normalised input
  pixels after `logits[i, target_i].backward()`; stored per channel, [N, 3, H, W] (LXT sums
  over dim 1 for its picture).

Cross-check against LXT's shipped ViT support: the same weights are copied into a torchvision
`VisionTransformer` (same architecture: pre-LN, LN eps 1e-6, exact GELU, class token, head on the
class token), LXT's own `vit_torch.cp_LRP` map is applied (`monkey_patch(vision_transformer)`),
and its relevance must equal `relevance_cp`; the maximum difference is stored in the metadata
(`torchvision_cp_max_abs_diff`). Every LXT variant runs in its own subprocess because LXT's
patches are global and cannot be undone.

Layout of the file (all float64 unless said): `model.*` the ViTForImageClassification
state_dict; `images` [4,3,32,32] normalised ((x/255 - 0.5) / 0.5); `image_index` [8] int64 =
[0,1,2,3,0,1,2,3]; `targets` [8] int64 = the predicted class of each image, then FIXED_CLASS (or
FIXED_CLASS+1 where the prediction is FIXED_CLASS); `logits` [4,10] of the unpatched model;
`relevance` [8,3,32,32] AttnLRP, row i explains targets[i] on images[image_index[i]];
`relevance_cp` [8,3,32,32] CP-LRP. Metadata: `config` (JSON of CONFIG), `image_files`,
`lxt_version`, `transformers_version`, `torch_version`, `torchvision_version`,
`torchvision_cp_max_abs_diff`, `rules` (a one-line summary).

Loading in the project's .venv (transformers 5 renamed the ViT keys; the tensors are the same):

    ref = safetensors.torch.load_file("tests/references/lxt_attnlrp.safetensors")
    state = {k[len("model."):]: v for k, v in ref.items() if k.startswith("model.")}
    config = json.loads(safe_open(path, "pt").metadata()["config"])
    model = ViTForImageClassification(ViTConfig(**config)).double().eval()
    model.load_state_dict(make_lxt_attnlrp.hf_to_transformers5(state))    # logits equal exactly
    # or torchvision: make_lxt_attnlrp.build_torchvision_model(state)      # logits within 2e-15

Conservation (checked when this file was made, float64): CP-LRP with every bias, the class
token and the position embedding zeroed gives pixel sums equal to the target logits; with them,
pixels + sum(b * db) over those additive parameters = logit to 1e-10. AttnLRP: pixels + those
parameters + what the softmaxes absorb ((sum A*dA - sum s*ds) / 2 per softmax, A and s with
LXT's gradients) = logit to 1e-10 (the residual is the 1e-10 of the GELU identity rule).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from functools import partial
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
OUTPUT = REPO / "tests" / "references" / "lxt_attnlrp.safetensors"
DATA = REPO.parent / "shared" / "data" / "cifar10" / "test"
CLASSES = ["airplane", "bird", "cat", "ship"]
FIXED_CLASS = 7
SEED = 0
CONFIG = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=48, num_hidden_layers=3,
              num_attention_heads=4, intermediate_size=96, hidden_act="gelu",
              layer_norm_eps=1e-6, qkv_bias=True, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0, num_labels=10)


def build_hf_model():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    config = ViTConfig(**CONFIG)
    config._attn_implementation = "sdpa"
    model = ViTForImageClassification(config).double().eval()
    reinitialise(model)
    return model


def reinitialise(model):
    """Seeded, clearly non-zero parameters (the Hugging Face init has zero biases and a tiny
    std, which would leave bias absorption and LayerNorm affine untested)."""
    generator = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float64)
            if "layernorm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif name.endswith(("cls_token", "position_embeddings")):
                param.copy_(0.5 * noise)
            else:  # linear and conv weights, [out, in, ...]
                fan_in = param[0].numel()
                param.copy_(noise / math.sqrt(fan_in))


def hf_to_torchvision(state):
    """The same weights as a torchvision VisionTransformer state_dict."""
    c = CONFIG
    out = {"class_token": state["vit.embeddings.cls_token"],
           "conv_proj.weight": state["vit.embeddings.patch_embeddings.projection.weight"],
           "conv_proj.bias": state["vit.embeddings.patch_embeddings.projection.bias"],
           "encoder.pos_embedding": state["vit.embeddings.position_embeddings"],
           "encoder.ln.weight": state["vit.layernorm.weight"],
           "encoder.ln.bias": state["vit.layernorm.bias"],
           "heads.head.weight": state["classifier.weight"],
           "heads.head.bias": state["classifier.bias"]}
    for i in range(c["num_hidden_layers"]):
        h, t = f"vit.encoder.layer.{i}.", f"encoder.layers.encoder_layer_{i}."
        out[t + "ln_1.weight"] = state[h + "layernorm_before.weight"]
        out[t + "ln_1.bias"] = state[h + "layernorm_before.bias"]
        out[t + "ln_2.weight"] = state[h + "layernorm_after.weight"]
        out[t + "ln_2.bias"] = state[h + "layernorm_after.bias"]
        qkv = [h + f"attention.attention.{n}" for n in ("query", "key", "value")]
        out[t + "self_attention.in_proj_weight"] = torch.cat([state[k + ".weight"] for k in qkv])
        out[t + "self_attention.in_proj_bias"] = torch.cat([state[k + ".bias"] for k in qkv])
        out[t + "self_attention.out_proj.weight"] = state[h + "attention.output.dense.weight"]
        out[t + "self_attention.out_proj.bias"] = state[h + "attention.output.dense.bias"]
        out[t + "mlp.0.weight"] = state[h + "intermediate.dense.weight"]
        out[t + "mlp.0.bias"] = state[h + "intermediate.dense.bias"]
        out[t + "mlp.3.weight"] = state[h + "output.dense.weight"]
        out[t + "mlp.3.bias"] = state[h + "output.dense.bias"]
    return out


def hf_to_transformers5(state):
    """The stored (transformers 4.x) ViTForImageClassification keys renamed to transformers 5.x's
    (`vit.encoder.layer.N.attention.attention.query` -> `vit.layers.N.attention.q_proj`, ...); the
    tensors are unchanged. Usable from the project's .venv: this module imports only torch, numpy
    and PIL at the top."""
    renames = [(".attention.attention.query.", ".attention.q_proj."),
               (".attention.attention.key.", ".attention.k_proj."),
               (".attention.attention.value.", ".attention.v_proj."),
               (".attention.output.dense.", ".attention.o_proj."),
               (".intermediate.dense.", ".mlp.fc1."),
               (".output.dense.", ".mlp.fc2."),
               ("vit.encoder.layer.", "vit.layers.")]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def build_torchvision_model(state):
    from torchvision.models.vision_transformer import VisionTransformer

    c = CONFIG
    model = VisionTransformer(image_size=c["image_size"], patch_size=c["patch_size"],
                              num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                              hidden_dim=c["hidden_size"], mlp_dim=c["intermediate_size"],
                              num_classes=c["num_labels"])
    model = model.double().eval()
    model.load_state_dict(hf_to_torchvision(state))
    return model


def load_images():
    images, files = [], []
    for name in CLASSES:
        path = sorted((DATA / name).glob("*.jpg"))[0]
        image = Image.open(path).convert("RGB").resize((CONFIG["image_size"],) * 2, Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float64) / 255.0).permute(2, 0, 1)
        images.append((array - 0.5) / 0.5)
        files.append(str(path.relative_to(REPO.parent)))
    return torch.stack(images), files


def lxt_relevance(variant, model_state, images, targets):
    """Runs in a fresh subprocess: patch with LXT, then x * dlogit/dx."""
    from lxt.efficient import monkey_patch
    from lxt.efficient.patches import (dropout_forward, layer_norm_forward, non_linear_forward,
                                       patch_attention, patch_cp_attention, patch_method)

    if variant == "torchvision_cp":
        from torchvision.models import vision_transformer

        monkey_patch(vision_transformer)  # LXT's DEFAULT_MAP entry: vit_torch.cp_LRP
        model = build_torchvision_model(model_state)
    else:
        from transformers.activations import GELUActivation
        from transformers.models.vit import modeling_vit

        patch_map = {
            torch.nn.LayerNorm: partial(patch_method, layer_norm_forward),
            GELUActivation: partial(patch_method, non_linear_forward, keep_original=True),
            torch.nn.Dropout: partial(patch_method, dropout_forward),
            modeling_vit: patch_attention if variant == "attnlrp" else patch_cp_attention,
        }
        monkey_patch(modeling_vit, patch_map)
        model = build_hf_model()
        model.load_state_dict(model_state)
    for param in model.parameters():
        param.requires_grad_(False)
    x = images.clone().requires_grad_(True)
    logits = model(x)
    logits = getattr(logits, "logits", logits)
    logits.gather(1, targets[:, None]).sum().backward()
    return {"relevance": (x * x.grad).detach(), "logits": logits.detach()}


def worker(variant, scratch):
    data = torch.load(Path(scratch) / "inputs.pt")
    result = lxt_relevance(variant, data["state"], data["images"], data["targets"])
    torch.save(result, Path(scratch) / f"{variant}.pt")


def main():
    from safetensors.torch import save_file

    torch.set_default_dtype(torch.float64)
    model = build_hf_model()
    images, files = load_images()
    with torch.no_grad():
        logits = model(images).logits
        tv_logits = build_torchvision_model(model.state_dict())(images)
    assert torch.allclose(logits, tv_logits, rtol=0, atol=1e-12), (logits - tv_logits).abs().max()
    predicted = logits.argmax(1)
    fixed = torch.where(predicted == FIXED_CLASS, (FIXED_CLASS + 1) % 10, FIXED_CLASS)
    image_index = torch.arange(8) % 4
    targets = torch.cat([predicted, fixed]).long()
    batch = images[image_index]

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        inputs = {"state": state, "images": batch, "targets": targets}
        torch.save(inputs, Path(scratch) / "inputs.pt")
        for variant in ("attnlrp", "cp", "torchvision_cp"):
            subprocess.run([sys.executable, __file__, "--worker", variant, scratch], check=True)
            results[variant] = torch.load(Path(scratch) / f"{variant}.pt")
    for variant, result in results.items():
        assert torch.allclose(result["logits"], logits[image_index], rtol=0, atol=1e-12), variant
    tv_diff = results["torchvision_cp"]["relevance"] - results["cp"]["relevance"]
    tv_diff = tv_diff.abs().max().item()
    assert tv_diff < 1e-12, tv_diff

    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    tensors.update(images=images.contiguous(), image_index=image_index, targets=targets,
                   logits=logits.contiguous(),
                   relevance=results["attnlrp"]["relevance"].contiguous(),
                   relevance_cp=results["cp"]["relevance"].contiguous())
    metadata = {
        "config": json.dumps(CONFIG),
        "image_files": json.dumps(files),
        "lxt_version": version("lxt"),
        "transformers_version": version("transformers"),
        "torch_version": torch.__version__,
        "torchvision_version": version("torchvision"),
        "torchvision_cp_max_abs_diff": repr(tv_diff),
        "rules": ("LXT 2.1 efficient: LayerNorm std detached (mean not), GELU identity "
                  "(g*gelu(x)/(x+1e-10)), q,k grad /4 and v grad /2 (AttnLRP) or q,k detached "
                  "(CP-LRP), softmax/linear/conv/adds plain gradient, relevance = x * x.grad"),
    }
    save_file(tensors, str(OUTPUT), metadata=metadata)
    for variant in ("attnlrp", "cp"):
        sums = results[variant]["relevance"].sum((1, 2, 3))
        chosen = logits[image_index].gather(1, targets[:, None])[:, 0]
        print(variant, "relevance sums", [f"{s:.4f}" for s in sums.tolist()])
        print(variant, "target logits ", [f"{s:.4f}" for s in chosen.tolist()])
    print(f"torchvision CP-LRP vs HF CP-LRP max |diff| {tv_diff:.3e}")
    print(f"wrote {OUTPUT.relative_to(REPO)} ({OUTPUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        torch.set_default_dtype(torch.float64)
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
