"""LoRA and LyCORIS networks (LoCon, LoHa, LoKr, full diff) applied per request, without touching the base weights.

Formats read (one file may mix them, module by module):
  LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): dW = up @ down * alpha / rank;
    kohya/A1111 `NAME.lora_up.weight` (out, r[, 1, 1]), `NAME.lora_down.weight` (r, in[, k, k]), `NAME.alpha`;
    conv LoRA / LoCon with a 3x3 down, or with `NAME.lora_mid.weight` (r, r, k, k) between 1x1 down and up;
    diffusers / PEFT `PART.MODULE.lora_A.weight` (down) / `.lora_B.weight` (up) under `unet.`, `text_encoder.`,
    `text_encoder_2.` (alpha from the file's `lora_adapter_metadata` when it has one, else alpha = rank).
  LoHa (LyCORIS, Yeh et al. 2023, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
    Evaluation"): dW = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / r (Hadamard product), r =
    hada_w1_b.shape[0].
  LoKr (LyCORIS): dW = kron(w1, w2) * alpha / r, w1 = lokr_w1 or lokr_w1_a @ lokr_w1_b, w2 likewise (4-d for a
    conv: (o2, i2, k, k)); scale alpha / r only when a factor is low-rank (r its inner size), else 1 (A1111's rule).
  full / diff (LyCORIS "full"): dW = NAME.diff.
Module names: kohya's `lora_unet_*` are the diffusers UNet's names (SD 1.x / 2.x) or the SGM/LDM names (SDXL), with
`_` for `.`; both are mapped onto this project's LDM module names (`input_blocks.1.1.transformer_blocks.0.attn1.to_q`)
by the block formula (diffusers `down_blocks.L.attentions.i` = LDM `input_blocks.{1 + L(n+1) + i}.1`, n =
num_res_blocks, as A1111's `convert_diffusers_name_to_compvis`). `lora_te_*` / `lora_te1_*` are transformers CLIP
names of the first text tower, `lora_te2_*` of the second; on an OpenCLIP tower (SD 2, SDXL bigG) `self_attn.q/k/v`
are the thirds of `attn.in_proj_weight`, `out_proj` is `attn.out_proj`, `mlp.fc1/fc2` are `mlp.c_fc/c_proj`.

How it is applied: `apply_loras(model, loras)` is a context manager. Inside it, the current thread (a contextvar)
sees the deltas; forward hooks on the targeted Linear / Conv2d modules add `multiplier * scale * delta(x)` to the
base output (`y = base(x) + up(down(x))`, LoRA kept low-rank; LoHa/LoKr as one dense dW per module, built once per
request), and an OpenCLIP `nn.MultiheadAttention` is recomputed with its merged weights. The base parameters are
never written, so the cached model stays bit-identical and a concurrent request without (or with other) LoRAs runs
its own weights through the same modules at the same time. Hooks are reference-counted: installed while some request
needs them, removed after, so a model without LoRA requests runs with no hooks at all.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, open_checkpoint
from .file_cache import FileCache

Tensor = torch.Tensor

# ------------------------------------------------------------------------------------------------ the prompt syntax

_TAG = re.compile(r"<lora:([^:>]+)((?::[^>]*?)*)>")  # A1111 `<lora:name:te:unet>` / `<lora:name:unet=..:te=..>`


@dataclass(frozen=True)
class LoraRef:
    """One `<lora:...>` tag: the name as written and its two multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0


def parse_prompt(prompt: str) -> tuple[str, list[LoraRef]]:
    """Remove every `<lora:name[:te[:unet]]>` (also `te=`, `unet=` named) from the prompt -> (text, refs).

    A1111's rules (`extra_networks_lora.py`): one positional number sets both multipliers, a second sets the UNet's;
    named `te=` / `unet=` override. `<lora:x>` alone is weight 1. Raises ValueError for a weight that is not a number.
    """
    refs: list[LoraRef] = []

    def take(m: re.Match) -> str:
        name = m.group(1).strip()
        args = [a.strip() for a in m.group(2).split(":")[1:]] if m.group(2) else []
        positional = [a for a in args if "=" not in a]
        named = dict(a.split("=", 1) for a in args if "=" in a)
        try:
            te = float(positional[0]) if positional and positional[0] else 1.0
            unet = float(positional[1]) if len(positional) > 1 and positional[1] else te
            te = float(named.get("te", te))
            unet = float(named.get("unet", unet))
        except ValueError:
            raise ValueError(f"<lora:{name}{m.group(2)}>: the weights must be numbers, as in <lora:{name}:0.8> or "
                             f"<lora:{name}:unet=0.8:te=0.5>") from None
        refs.append(LoraRef(name, te, unet))
        return ""

    return _TAG.sub(take, prompt), refs


def format_hashes(items: list[tuple[str, str]]) -> str:
    """A1111's `Lora hashes` / `TI hashes` value: "name: hash, name2: hash2" (quoted by the infotext writer)."""
    return ", ".join(f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in items)


def parse_hashes(value: str) -> dict[str, str]:
    """The inverse of format_hashes: {name: hash}."""
    out = {}
    for part in value.split(","):
        if ":" in part:
            n, h = part.rsplit(":", 1)
            out[n.strip()] = h.strip()
    return out


def lora_hash(path: str | os.PathLike) -> str:
    """A1111's LoRA short hash: the first 12 hex digits of sha256 over the tensor data of a .safetensors (the bytes
    after its header: kohya's / AddNet's hash, `addnet_hash_safetensors`), or over the whole file otherwise."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if str(path).lower().endswith(".safetensors"):
            n = int.from_bytes(f.read(8), "little")
            f.seek(8 + n)
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


# ------------------------------------------------------------------------------------------------ reading a file


@dataclass
class Patch:
    """One module's change in a file, before it is matched to a model. Tensors float32, CPU."""

    kind: str                          # "lora" | "loha" | "lokr" | "diff"
    tensors: dict[str, Tensor]         # the file's suffixes -> tensors (lora_up, lora_down, lora_mid, hada_w1_a ...)
    alpha: float | None = None

    def scale(self) -> float:
        """alpha / rank where the file gives alpha and the kind has a rank; else 1."""
        t = self.tensors
        rank = None
        if self.kind == "lora":
            rank = t["lora_down"].shape[0]
        elif self.kind == "loha":
            rank = t["hada_w1_b"].shape[0]
        elif self.kind == "lokr":
            if "lokr_w1_b" in t:
                rank = t["lokr_w1_b"].shape[0]
            if "lokr_w2_b" in t:
                rank = t["lokr_w2_b"].shape[0]
        return self.alpha / rank if (self.alpha is not None and rank) else 1.0

    def dense(self, shape: tuple[int, ...]) -> Tensor:
        """dW of the module's weight `shape` (out, in[, k, k]), without scale or multiplier."""
        t = self.tensors
        if self.kind == "lora":
            up, down = t["lora_up"].flatten(1), t["lora_down"]          # (out, r), (r, in[, k, k])
            if "lora_mid" in t:                                        # Tucker core: (r, r, k, k)
                mid = t["lora_mid"]
                w = torch.einsum("o r, r s h w, s i -> o i h w", up, mid, down.flatten(1))
            else:
                w = up @ down.flatten(1)                               # (out, in * k * k)
        elif self.kind == "loha":
            w = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])  # (out, in * k * k)
        elif self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]      # (o1, i1)
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]      # (o2, i2[ k k]) or (o2, i2, k, k)
            # A1111's make_kron: a 2-d w2 of a conv gives the same (out, in, k, k) after the reshape below
            w = torch.kron(w1[:, :, None, None], w2) if w2.dim() == 4 else torch.kron(w1, w2)
        else:
            w = t["diff"]
        if w.numel() != int(torch.tensor(shape).prod()):
            raise ValueError(f"makes a {tuple(w.shape)} change for a {tuple(shape)} weight")
        return w.reshape(shape)


# suffix -> kind; a module's kind is that of its tensors
_SUFFIX_KIND = {"lora_up.weight": "lora", "lora_down.weight": "lora", "lora_mid.weight": "lora",
                "hada_w1_a": "loha", "hada_w1_b": "loha", "hada_w2_a": "loha", "hada_w2_b": "loha",
                "lokr_w1": "lokr", "lokr_w1_a": "lokr", "lokr_w1_b": "lokr", "lokr_w2": "lokr", "lokr_w2_a": "lokr",
                "lokr_w2_b": "lokr", "diff": "diff"}
_REQUIRED = {"lora": ({"lora_up", "lora_down"},), "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
             "diff": ({"diff"},)}
_UNSUPPORTED = ("hada_t1", "hada_t2", "lokr_t2", "dora_scale", "oft_blocks", "oft_diag", "on_input", "w_norm",
                "b_norm", "diff_b", "bias_indices")
_PEFT_PARTS = (("unet.", "lora_unet_"), ("text_encoder_2.", "lora_te2_"), ("text_encoder.", "lora_te1_"))


def _peft_name(key: str) -> str | None:
    """`unet.down_blocks.0....to_q.lora_A.weight` -> `lora_unet_down_blocks_0_..._to_q.lora_down.weight`."""
    for part, prefix in _PEFT_PARTS:
        if key.startswith(part):
            rest = key[len(part):]
            for peft, kohya in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
                if rest.endswith(peft):
                    module = rest[: -len(peft)]
                    if prefix != "lora_unet_" and not module.startswith("text_model."):
                        module = "text_model." + module
                    return prefix + module.replace(".", "_") + kohya
    return None


def _peft_alphas(metadata: dict) -> dict[str, float]:
    """diffusers' `lora_adapter_metadata` (a JSON of {"unet": {"r", "lora_alpha"}, ...} or flat "unet.r" keys)
    -> {kohya prefix: alpha / r} for the parts it describes."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except ValueError:
        return {}
    out = {}
    for part, prefix in _PEFT_PARTS:
        name = part.rstrip(".")
        cfg = meta.get(name) if isinstance(meta.get(name), dict) else {
            k[len(part):]: v for k, v in meta.items() if k.startswith(part)}
        if cfg and cfg.get("r") and cfg.get("lora_alpha") is not None:
            out[prefix] = float(cfg["lora_alpha"]) / float(cfg["r"])
    return out


@dataclass
class LoraFile:
    """A parsed LoRA / LyCORIS file: module name (kohya form, `lora_unet_...`) -> Patch."""

    path: Path
    patches: dict[str, Patch]
    unknown: list[str] = field(default_factory=list)   # tensor names of no supported kind (reported)
    unsupported: list[str] = field(default_factory=list)  # modules of a kind this engine does not apply (DoRA ...)

    @property
    def name(self) -> str:
        return self.path.stem


def read_lora(path: str | os.PathLike) -> LoraFile:
    """Parse a LoRA / LyCORIS file (.safetensors header-checked; .pt/.ckpt weights only, by sd.checkpoint).

    Raises CheckpointError (one line, naming the file) when it is not readable or holds no LoRA tensors."""
    path = Path(path)
    ckpt = open_checkpoint(path)
    peft_alpha = _peft_alphas(ckpt.metadata)
    groups: dict[str, dict[str, Tensor]] = {}
    alphas: dict[str, float] = {}
    unknown = []
    for key in ckpt.infos:
        name = key
        if not key.startswith(("lora_unet_", "lora_te")):
            name = _peft_name(key)
            if name is None:
                unknown.append(key)
                continue
        module, _, suffix = name.partition(".")
        if suffix == "alpha":
            alphas[module] = float(ckpt.get(key).float().reshape(-1)[0])
        elif suffix in _SUFFIX_KIND or suffix.split(".")[0] in _UNSUPPORTED:
            groups.setdefault(module, {})[suffix.removesuffix(".weight")] = ckpt.get(key).float()
        else:
            unknown.append(key)
    patches: dict[str, Patch] = {}
    unsupported = []
    for module, tensors in groups.items():
        if any(s.split(".")[0] in _UNSUPPORTED for s in tensors):
            unsupported.append(module)
            continue
        kinds = {_SUFFIX_KIND[s + ".weight"] if s + ".weight" in _SUFFIX_KIND else _SUFFIX_KIND[s] for s in tensors}
        kind = kinds.pop() if len(kinds) == 1 else None
        ok = kind is not None and (kind == "lokr" and (("lokr_w1" in tensors or {"lokr_w1_a", "lokr_w1_b"} <= set(tensors))
                                                        and ("lokr_w2" in tensors or {"lokr_w2_a", "lokr_w2_b"} <= set(tensors)))
                                   or kind != "lokr" and any(req <= set(tensors) for req in _REQUIRED.get(kind, ())))
        if not ok:
            unknown.extend(f"{module}.{s}" for s in tensors)
            continue
        patches[module] = Patch(kind, tensors, alphas.get(module))
    # PEFT files have no per-module alpha: alpha / r from their metadata, as an alpha of (scale * rank)
    for module, p in patches.items():
        if p.alpha is None and p.kind == "lora":
            for prefix, s in peft_alpha.items():
                if module.startswith(prefix):
                    p.alpha = s * p.tensors["lora_down"].shape[0]
    if not patches and not unsupported:
        raise CheckpointError(f"{path.name}: not a LoRA or LyCORIS file (no lora_up/lora_down, lora_A/lora_B, hada_* "
                              "or lokr_* tensors); put LoRA files in the LoRA folder, checkpoints in the models folder")
    return LoraFile(path, patches, unknown, unsupported)


_FILE_CACHE: FileCache[LoraFile] = FileCache(read_lora, 8)


def load_lora(path: str | os.PathLike) -> LoraFile:
    """read_lora, cached by (path, size, mtime) (the last 8 files)."""
    return _FILE_CACHE.get(path)


# ------------------------------------------------------------------------------------------------ names -> modules

_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
           "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def diffusers_to_ldm(name: str, num_res_blocks: int, output_blocks=None) -> str:
    """A diffusers UNet module name with `_` (kohya's SD 1.x/2.x form, `lora_unet_` stripped) -> the LDM name with
    `_`. Block formula (n = num_res_blocks): down_blocks.L.{attentions,resnets}.i -> input_blocks.{1 + L(n+1) + i}.
    {1,0}; down_blocks.L.downsamplers.0.conv -> input_blocks.{(L+1)(n+1)}.0.op; mid_block.attentions.0 ->
    middle_block.1, mid_block.resnets.i -> middle_block.{2i}; up_blocks.L.{attentions,resnets}.i -> output_blocks.
    {L(n+1) + i}.{1,0}; up_blocks.L.upsamplers.0.conv -> output_blocks.{L(n+1) + n}.{last}.conv; resnet conv1 / conv2
    / time_emb_proj / conv_shortcut -> in_layers.2 / out_layers.3 / emb_layers.1 / skip_connection. A name that is
    already in LDM form (SDXL kohya files) comes back unchanged."""
    per = num_res_blocks + 1

    def sub(kind: str, rest: str) -> str:
        if kind == "resnets":
            for k, v in _RESNET.items():
                if rest == k or rest.startswith(k + "_"):
                    return v + rest[len(k):]
        return rest

    fixed = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding_linear_1": "time_embed_0",
             "time_embedding_linear_2": "time_embed_2", "add_embedding_linear_1": "label_emb_0_0",
             "add_embedding_linear_2": "label_emb_0_2"}
    for k, v in fixed.items():
        if name == k or name.startswith(k + "_"):
            return v + name[len(k):]
    if m := re.fullmatch(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        lvl, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"input_blocks_{1 + lvl * per + i}_{1 if kind == 'attentions' else 0}_{sub(kind, rest)}"
    if m := re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv(.*)", name):
        return f"input_blocks_{(int(m[1]) + 1) * per}_0_op{m[2]}"
    if m := re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)_(.+)", name):
        kind, i, rest = m[1], int(m[2]), m[3]
        return f"middle_block_{1 if kind == 'attentions' else 2 * i}_{sub(kind, rest)}"
    if m := re.fullmatch(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", name):
        lvl, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        return f"output_blocks_{lvl * per + i}_{1 if kind == 'attentions' else 0}_{sub(kind, rest)}"
    if m := re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv(.*)", name):
        idx = int(m[1]) * per + num_res_blocks
        last = len(output_blocks[idx]) - 1 if output_blocks is not None and idx < len(output_blocks) else 2
        return f"output_blocks_{idx}_{last}_conv{m[2]}"
    return name


@dataclass(frozen=True)
class Target:
    """A module a patch lands on: a Linear / Conv2d, or one slot (q, k, v, out) of an nn.MultiheadAttention."""

    module: nn.Module
    name: str                     # our dotted module name (with the part: "unet.input_blocks.1.1...")
    slot: str = ""                # MHA: "q" | "k" | "v" | "out"
    part: str = "unet"            # "unet" | "te" (which multiplier applies)

    @property
    def shape(self) -> tuple[int, ...]:
        if isinstance(self.module, nn.MultiheadAttention):
            e = self.module.embed_dim
            return (e, e)
        return tuple(self.module.weight.shape)


def _leaf_map(root: nn.Module, prefix: str, part: str) -> dict[str, Target]:
    """{underscored name: Target} for every Linear / Conv2d under root."""
    return {name.replace(".", "_"): Target(mod, f"{prefix}.{name}", part=part)
            for name, mod in root.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}


def _openclip_aliases(encoder: nn.Module, prefix: str) -> dict[str, Target]:
    """transformers CLIP names (kohya's) of an OpenCLIP tower's modules: layer i's self_attn q/k/v/out -> slots of
    transformer.resblocks.i.attn, mlp_fc1 / mlp_fc2 -> mlp.c_fc / mlp.c_proj."""
    out = {}
    for i, block in enumerate(encoder.transformer.resblocks):
        base = f"text_model_encoder_layers_{i}_"
        for slot in ("q", "k", "v"):
            out[base + f"self_attn_{slot}_proj"] = Target(block.attn, f"{prefix}.transformer.resblocks.{i}.attn", slot, "te")
        out[base + "self_attn_out_proj"] = Target(block.attn, f"{prefix}.transformer.resblocks.{i}.attn", "out", "te")
        out[base + "mlp_fc1"] = Target(block.mlp.c_fc, f"{prefix}.transformer.resblocks.{i}.mlp.c_fc", part="te")
        out[base + "mlp_fc2"] = Target(block.mlp.c_proj, f"{prefix}.transformer.resblocks.{i}.mlp.c_proj", part="te")
    return out


def model_targets(parts) -> dict[str, Target]:
    """{kohya module name (`lora_unet_input_blocks_1_1_...`, `lora_te1_text_model_...`): Target} of a loaded model's
    parts (`Components`: .unet, .text_encoders). `lora_te_` and `lora_te1_` name the first tower, `lora_te2_` the
    second."""
    out = {f"lora_unet_{k}": v for k, v in _leaf_map(parts.unet, "unet", "unet").items()}
    for idx, enc in enumerate(parts.text_encoders):
        cfg = getattr(enc, "cfg", None)
        names = (_openclip_aliases(enc, f"te{idx + 1}") if getattr(cfg, "naming", "") == "openclip"
                 else _leaf_map(enc, f"te{idx + 1}", "te"))
        for k, v in names.items():
            out[f"lora_te{idx + 1}_{k}"] = v
            if idx == 0:
                out[f"lora_te_{k}"] = v
    return out


# The text-conditioning width each released UNet family was trained with: only to word the refusal of a LoRA made
# for another one (the check itself compares the widths).
_CONTEXT_HINT = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


def match(lf: LoraFile, parts, targets: dict[str, Target] | None = None, label: str = "this model"
          ) -> tuple[list[tuple[Target, Patch]], list[str]]:
    """Pair the file's patches with the model's modules -> ([(target, patch)], names that match nothing).

    Raises ValueError (one line) when the file was made for another family: its cross-attention keys are of another
    text width, it has a second text tower's keys and the model has one, or a matched module's shape differs."""
    targets = model_targets(parts) if targets is None else targets
    ucfg = getattr(parts.unet, "cfg", None)     # an MMDiT (SD3) has no LDM blocks: its names match nothing here
    nrb = getattr(ucfg, "num_res_blocks", 2)
    pairs, unmatched = [], []
    for module, patch in lf.patches.items():
        name = module
        if module.startswith("lora_unet_"):
            name = "lora_unet_" + diffusers_to_ldm(module[len("lora_unet_"):], nrb,
                                                   getattr(parts.unet, "output_blocks", None))
        t = targets.get(name)
        if t is None:
            unmatched.append(module)
        else:
            pairs.append((t, patch))
    ctx = getattr(ucfg, "context_dim", None)
    for t, patch in pairs:
        if ctx and t.name.endswith(("attn2.to_k", "attn2.to_v")) and patch.kind == "lora" and patch.tensors["lora_down"].shape[1] != ctx:
            w = patch.tensors["lora_down"].shape[1]
            raise ValueError(f"{lf.path.name}: a LoRA for {_CONTEXT_HINT.get(w, 'another model')} ({w}-wide text "
                             f"conditioning), {label} has {ctx}: choose a LoRA made for {label}")
    if any(m.startswith("lora_te2_") for m in unmatched) and len(parts.text_encoders) < 2:
        raise ValueError(f"{lf.path.name}: a LoRA for a model with two text encoders (SDXL), {label} has one: choose a "
                         f"LoRA made for {label}")
    bad = []
    for t, patch in pairs:
        try:
            patch.dense(t.shape) if patch.kind != "lora" else _check_lora_shape(patch, t.shape)
        except ValueError as e:
            bad.append(f"{t.name} ({e})")
    if bad:
        raise ValueError(f"{lf.path.name}: does not fit {label}: {bad[0]}"
                         + (f" and {len(bad) - 1} more" if len(bad) > 1 else "") + "; choose a LoRA made for it")
    if not pairs and lf.patches:
        raise ValueError(f"{lf.path.name}: none of its {len(lf.patches)} modules is a layer of {label} (e.g. "
                         f"{next(iter(lf.patches))}); it was made for another model")
    return pairs, unmatched


def _check_lora_shape(patch: Patch, shape: tuple[int, ...]) -> None:
    """A LoRA's factors fit a (out, in[, k, k]) weight: 1x1 factors fit a Linear and a 1x1 conv alike."""
    up, down = patch.tensors["lora_up"], patch.tensors["lora_down"]
    k, dk = tuple(shape[2:]), tuple(down.shape[2:])
    pointwise = ((), (1, 1))
    fits = up.shape[0] == shape[0] and down.shape[1] == shape[1] and up.flatten(1).shape[1] == down.shape[0]
    if "lora_mid" in patch.tensors:
        fits = fits and tuple(patch.tensors["lora_mid"].shape[2:]) == k and dk in pointwise
    else:
        fits = fits and (dk == k or (dk in pointwise and k in pointwise))
    if not fits:
        raise ValueError(f"up {tuple(up.shape)} / down {tuple(down.shape)} for a {tuple(shape)} weight")


# ------------------------------------------------------------------------------------------------ applying


class _Delta:
    """What one module adds in one request: a sum of terms, each delta(x) of a Linear / Conv2d's input."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.low_rank: list[tuple[Tensor, Tensor, Tensor | None]] = []   # (down, up * s, mid): LoRA kept factored
        self.dense: Tensor | None = None                                 # sum of dense dW * s (LoHa, LoKr, diff)

    def add(self, patch: Patch, s: float, shape, device, dtype) -> None:
        t = patch.tensors
        if patch.kind == "lora" and not isinstance(self.module, nn.MultiheadAttention):
            down = t["lora_down"].to(device, dtype)
            up = (t["lora_up"] * s).to(device, dtype)
            mid = t["lora_mid"].to(device, dtype) if "lora_mid" in t else None
            self.low_rank.append((down, up, mid))
        else:
            w = (patch.dense(shape) * s).to(device, dtype)
            self.dense = w if self.dense is None else self.dense + w

    def __call__(self, x: Tensor) -> Tensor:
        m = self.module
        y = None
        if isinstance(m, nn.Conv2d):
            conv = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
            for down, up, mid in self.low_rank:
                d4 = down if down.dim() == 4 else down[:, :, None, None]     # (r, in, k, k) or (r, in, 1, 1)
                if mid is not None:
                    h = F.conv2d(F.conv2d(x, d4), mid, **conv)               # (B, r, h', w')
                else:
                    h = F.conv2d(x, d4, **conv)                             # (B, r, h', w')
                term = F.conv2d(h, up if up.dim() == 4 else up[:, :, None, None])  # (B, out, h', w')
                y = term if y is None else y + term
            if self.dense is not None:
                term = F.conv2d(x, self.dense, **conv)
                y = term if y is None else y + term
        else:
            for down, up, _ in self.low_rank:
                term = F.linear(F.linear(x, down.flatten(1)), up.flatten(1))  # (..., r) -> (..., out)
                y = term if y is None else y + term
            if self.dense is not None:
                term = F.linear(x, self.dense.flatten(1))
                y = term if y is None else y + term
        return y


class _MHADelta:
    """The dense q / k / v / out changes of one nn.MultiheadAttention (OpenCLIP towers) in one request."""

    def __init__(self, module: nn.MultiheadAttention):
        self.module = module
        self.slots: dict[str, Tensor] = {}

    def add(self, patch: Patch, s: float, slot: str, shape, device, dtype) -> None:
        w = (patch.dense(shape) * s).to(device, dtype)
        self.slots[slot] = self.slots[slot] + w if slot in self.slots else w

    def forward(self, query: Tensor, attn_mask: Tensor | None) -> Tensor:
        """Self-attention (batch first) with merged weights: query (B, T, E) -> (B, T, E)."""
        m = self.module
        e = m.embed_dim
        w_in = m.in_proj_weight                                          # (3E, E)
        dq = [self.slots.get(s, None) for s in ("q", "k", "v")]
        if any(d is not None for d in dq):
            w_in = w_in + torch.cat([d if d is not None else torch.zeros(e, e, device=w_in.device, dtype=w_in.dtype)
                                     for d in dq])
        w_out = m.out_proj.weight + self.slots["out"] if "out" in self.slots else m.out_proj.weight
        b, t, _ = query.shape
        qkv = F.linear(query, w_in, m.in_proj_bias)                       # (B, T, 3E)
        q, k, v = (z.reshape(b, t, m.num_heads, e // m.num_heads).transpose(1, 2) for z in qkv.chunk(3, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, T, d)
        return F.linear(o.transpose(1, 2).reshape(b, t, e), w_out, m.out_proj.bias)


_ACTIVE: contextvars.ContextVar[dict[int, object] | None] = contextvars.ContextVar("sd_lora_active", default=None)
_HOOKS: dict[int, list] = {}      # id(module) -> [handle, users]
_HOOK_LOCK = threading.Lock()


def _linear_hook(module, args, out):
    active = _ACTIVE.get()
    d = active.get(id(module)) if active else None
    return out if d is None else out + d(args[0])


def _mha_hook(module, args, kwargs, out):
    active = _ACTIVE.get()
    d = active.get(id(module)) if active else None
    if d is None:
        return out
    return d.forward(args[0], kwargs.get("attn_mask")), None


def _hook(module: nn.Module) -> None:
    with _HOOK_LOCK:
        entry = _HOOKS.get(id(module))
        if entry is None:
            if isinstance(module, nn.MultiheadAttention):
                h = module.register_forward_hook(_mha_hook, with_kwargs=True)
            else:
                h = module.register_forward_hook(_linear_hook)
            _HOOKS[id(module)] = [h, 1]
        else:
            entry[1] += 1


def _unhook(module: nn.Module) -> None:
    with _HOOK_LOCK:
        entry = _HOOKS.get(id(module))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            entry[0].remove()
            del _HOOKS[id(module)]


@dataclass
class Applied:
    """What `apply_loras` did: per file its name, hash and the names that matched nothing."""

    files: list[tuple[str, str]] = field(default_factory=list)          # (name, short hash)
    unmatched: dict[str, list[str]] = field(default_factory=dict)       # file name -> module names
    modules: int = 0                                                    # patched modules

    def notes(self) -> list[str]:
        out = []
        for name, mods in self.unmatched.items():
            shown = ", ".join(mods[:5]) + (f" and {len(mods) - 5} more" if len(mods) > 5 else "")
            out.append(f"LoRA {name}: {len(mods)} of its modules match no layer of this model and were left out: "
                       f"{shown}")
        return out


@contextlib.contextmanager
def apply_loras(parts, loras: list[tuple[LoraFile, float, float]], label: str = "this model"):
    """Within the block, this thread's forwards of `parts` (.unet, .text_encoders) include the LoRAs:
    [(file, te multiplier, unet multiplier)]. Yields an `Applied`. Nothing of the model's parameters is written."""
    applied = Applied()
    if not loras:
        yield applied
        return
    targets = model_targets(parts)
    p = next(parts.unet.parameters())
    device = p.device
    deltas: dict[int, object] = {}
    for lf, te_mult, unet_mult in loras:
        pairs, unmatched = match(lf, parts, targets, label)
        for t, patch in pairs:
            mult = te_mult if t.part == "te" else unet_mult
            if mult == 0:
                continue
            dtype = t.module.in_proj_weight.dtype if isinstance(t.module, nn.MultiheadAttention) else t.module.weight.dtype
            s = patch.scale() * mult
            if isinstance(t.module, nn.MultiheadAttention):
                d = deltas.setdefault(id(t.module), _MHADelta(t.module))
                d.add(patch, s, t.slot, t.shape, device, dtype)
            else:
                d = deltas.setdefault(id(t.module), _Delta(t.module))
                d.add(patch, s, t.shape, device, dtype)
        applied.files.append((lf.name, lora_hash(lf.path)))
        if unmatched or lf.unknown or lf.unsupported:
            applied.unmatched[lf.name] = [*unmatched, *lf.unsupported, *lf.unknown]
    modules = [d.module for d in deltas.values()]
    applied.modules = len(modules)
    for m in modules:
        _hook(m)
    token = _ACTIVE.set({**(_ACTIVE.get() or {}), **deltas})
    try:
        yield applied
    finally:
        _ACTIVE.reset(token)
        for m in modules:
            _unhook(m)
