"""The original latent diffusion models ("SD v0"; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
Diffusion Models"), diffusing in the latent space of a taming VQGAN-style VQ first stage (Esser et al. 2021, "Taming
Transformers for High-Resolution Image Synthesis") or a KL autoencoder. The same openaimodel UNet as SD 1.x, other
numbers read from shapes.

Families (app tab "ldm"):
- `ldm-uncond-vq-f4`: unconditional CelebA-HQ / FFHQ / LSUN bedrooms 256 (one layout, told apart by nothing but their
  weights): VQ-f4 (3 latent channels), no cond stage, openaimodel's legacy AttentionBlock; runs.
- `ldm-cin256-v2` (VQ-f4, 3 channels) and `ldm-cin256` (VQ-f8, 4 channels): class-conditional ImageNet,
  `cond_stage_model.embedding` (ClassEmbedder) as a (B, 1, D) crossattn; cin256-v2 has the null class 1000 that
  classifier-free guidance uses as the unconditional branch (cin256 has none: CFG is not available); both run.
- `ldm-bsr-sr`: 4x super-resolution, the low-res image (= the latent size) as a 3-channel concat; runs.
- `ldm-uncond-kl-f8`: unconditional LSUN churches 256 (KL-f8, scale-shift-norm ResBlocks with resblock_updown, the
  latent scale from the file's `scale_factor` buffer: scale_by_std); runs.
- `ldm-inpainting-big`: inpainting (VQ-f4 without attention; the masked image through the cond stage, a copy of the
  first stage, + the mask as a 4-channel concat; resblock_updown); runs.
- `ldm-txt2img-f8-large` (KL-f8) / `ldm-text2img256` (VQ-f4): text-to-image with LDM's own text transformer
  (sd/ldm_bert.py) over BERT's uncased WordPiece vocabulary (a vocab.txt the user provides); run.
- detected and loaded, not run yet: `ldm-semantic` (segmentation map concat), `ldm-layout2img` (bounding-box
  tokens through the same transformer), `ldm-rdm` (retrieval database).
Recognised by structure only: which first stage (VQ or KL, its latent channels and factor), which cond stage (class
embedding, text transformer, channel mapper, a first-stage copy, none), concat channels, the legacy attention blocks.

Conventions (issue 11): sigmas from the file's `alphas_cumprod` buffer (k-diffusion's CompVisDenoiser); attention
heads, which shapes cannot tell, from each released config (32 channels per head for celeba/ffhq/beds, cin256 v1,
text2img256, bsr_sr; 1 head for cin256-v2; 8 heads for txt2img-f8-large, lsun_churches256 and inpainting_big);
the latent scale is the file's `scale_factor` buffer where it has one, else the released config's; decode = z / scale,
quantize to the nearest code, post_quant_conv, decoder (sd.vq.VQModel.decode).
"""
from __future__ import annotations

import ast
import importlib.util
import math
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..checkpoint import CheckpointError, ignore_reason

from ..config import LatentFormat, TextEncoderConfig, VQConfig
from ..inpaint import image_to_tensor, load_image, mask_to_tensor
from .common import INPAINT_INPUTS, batched, inpaint_check
from .family import Family, Input
from .shapes import detect_first_stage, has

COND = "cond_stage_model."
CLASS_KEY = COND + "embedding.weight"            # ClassEmbedder (n_classes, D)
BERT = COND + "transformer.attn_layers."          # x-transformers TransformerWrapper (BERTEmbedder)
MAPPER = COND + "channel_mapper.weight"           # SpatialRescaler (semantic synthesis)
COND_VQ = COND + "quantize.embedding.weight"      # cond stage = the first stage (inpainting_big, __is_first_stage__)
TEXT = COND + "transformer."                      # the BERTEmbedder's TransformerWrapper
NULL_CLASS = 1000                                 # cin256-v2's unconditional class (ClassEmbedder n_classes 1001)

VQ_F4 = LatentFormat(scale=1.0, shift=0.0, channels=3, factor=4)    # released configs: scale_factor 1.0
VQ_F8 = LatentFormat(scale=1.0, shift=0.0, channels=4, factor=8)
KL_F8_STD = LatentFormat(scale=1.0, shift=0.0, channels=4, factor=8)  # lsun_churches: the file's scale_factor
KL_F8 = LatentFormat(scale=0.18215, shift=0.0, channels=4, factor=8)  # txt2img-f8-large.yaml scale_factor
KL_F16 = LatentFormat(scale=0.22765929, shift=0.0, channels=16, factor=16)  # rdm_768x768 config
# Latent -> RGB previews: the VQ/KL latents are not RGB; a neutral grey mapping of the first channels.
_GREY3 = (((0.33, 0.33, 0.33), (0.33, 0.33, 0.33), (0.33, 0.33, 0.33)), (0.0, 0.0, 0.0))
_GREY4 = (((0.25, 0.25, 0.25),) * 4, (0.0, 0.0, 0.0))
_GREY16 = (((0.0625, 0.0625, 0.0625),) * 16, (0.0, 0.0, 0.0))
_SD_RGB4 = (((0.3512, 0.2297, 0.3227), (0.3250, 0.4974, 0.2350), (-0.2829, 0.1762, 0.2721),
             (-0.2120, -0.2616, -0.7177)), (0.0, 0.0, 0.0))


# ------------------------------------------------------------------------------------------------ recognising


def _first_stage(shapes):
    try:
        return detect_first_stage(shapes)
    except Exception:  # noqa: BLE001 - a damaged first stage is reported by the loader
        return None


def _vq(shapes) -> bool:
    return isinstance(_first_stage(shapes), VQConfig)


def _kl(shapes) -> bool:
    fs = _first_stage(shapes)
    return fs is not None and not isinstance(fs, VQConfig)


def _no_cond(shapes) -> bool:
    return not has(shapes, COND)


def uncond(shapes, unet) -> bool:
    """No cond stage, the legacy AttentionBlock, a VQ first stage (celeba / ffhq / lsun beds; bsr_sr by concat)."""
    return _no_cond(shapes) and unet.legacy_attention and not unet.context_dim and _vq(shapes)


def uncond_kl(shapes, unet) -> bool:
    """No cond stage, the legacy AttentionBlock, a KL first stage (lsun_churches256)."""
    return _no_cond(shapes) and unet.legacy_attention and not unet.context_dim and _kl(shapes)


def first_stage_cond(shapes, unet) -> bool:
    """The cond stage is a VQ first stage (inpainting_big: `cond_stage_model.quantize`), the legacy AttentionBlock."""
    return COND_VQ in shapes and _vq(shapes) and unet.legacy_attention and not unet.context_dim


def classes(shapes, unet) -> bool:
    return CLASS_KEY in shapes and unet.context_dim > 0 and _vq(shapes)


def semantic(shapes, unet) -> bool:
    return MAPPER in shapes and _vq(shapes)


def bert(depth_one: bool, first_stage):
    def match(shapes, unet) -> bool:
        one = max(unet.transformer_depth + (unet.transformer_depth_middle,)) == 1
        return has(shapes, BERT) and unet.context_dim > 0 and one == depth_one and first_stage(shapes)
    return match


def rdm(shapes, unet) -> bool:
    return _no_cond(shapes) and unet.context_dim > 0 and not unet.legacy_attention and _kl(shapes)


# ------------------------------------------------------------------------------------------------ building


def _heads(per_head: int = 0, count: int = 0):
    """The released config's attention heads (shapes cannot tell): `per_head` channels per head, or `count` heads."""
    def unet_config(shapes, unet):
        if per_head:
            return replace(unet, num_heads=-1, num_head_channels=per_head)
        return replace(unet, num_heads=count, num_head_channels=-1)
    return unet_config


def build_plain(shapes, unet):
    return detect_first_stage(shapes), ()


def class_tower(shapes) -> TextEncoderConfig:
    """The ClassEmbedder as a cond-stage "tower" (sd.text naming "class"): (n_classes, D) read from the file."""
    n, d = shapes[CLASS_KEY]
    return TextEncoderConfig(naming="class", prefix=COND, width=d, layers=0, heads=1, mlp=0, vocab_size=n,
                             context_length=1, projection_dim=0, pad_token=0, layer="last", final_ln=False)


def build_class(shapes, unet):
    return detect_first_stage(shapes), (class_tower(shapes),)


def build_text(shapes, unet):
    from ..ldm_bert import bert_config

    return detect_first_stage(shapes), (bert_config(shapes, TEXT),)


def file_scale(ckpt, latent: LatentFormat) -> tuple[LatentFormat, str]:
    """The latent scale of this file: its `scale_factor` buffer where it has one (scale_by_std: lsun_churches256,
    set to 1 / std of the first training batch's latents and saved), else the released config's (`latent`)."""
    if "scale_factor" not in ckpt.shapes():
        return latent, ""
    t = ckpt.get("scale_factor").float().reshape(-1)
    v = float(t[0]) if t.numel() == 1 else float("nan")
    if not (math.isfinite(v) and v > 0):
        return latent, (f"the file's scale_factor buffer is not a positive number ({v:g}): the released config's "
                        f"{latent.scale:g} is used")
    return replace(latent, scale=v), f"latent scale factor {v:.6g} from the file's scale_factor buffer"


# ------------------------------------------------------------------------------------------------ conditioning


@lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order, from torchvision's bundled weight metadata (offline): the
    `_IMAGENET_CATEGORIES` literal of torchvision/models/_meta.py, read as data without importing torchvision, whose
    import pulls in torch._dynamo (2 s of the app's start); the import is the fallback if that file changes shape."""
    spec = importlib.util.find_spec("torchvision")
    meta = Path(spec.origin).parent / "models" / "_meta.py" if spec and spec.origin else None
    if meta is not None and meta.is_file():
        for node in ast.parse(meta.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["_IMAGENET_CATEGORIES"]:
                names = tuple(ast.literal_eval(node.value))
                if len(names) == 1000:
                    return names
    from torchvision.models import ResNet50_Weights

    return tuple(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def class_index(value) -> int:
    """A class label as given: an index 0..999, "207", "207: golden retriever" or a class name (any case).
    ValueError (one line) saying what to give otherwise."""
    text = str(value).strip()
    head = text.split(":", 1)[0].strip()
    try:
        idx = int(float(head))
        if float(head) != idx:
            raise ValueError
    except ValueError:
        names = {n.lower(): i for i, n in enumerate(imagenet_classes())}
        if text.lower() in names:
            return names[text.lower()]
        raise ValueError(f"class label {text[:60]!r} is neither an ImageNet class index (0..999) nor a class name; "
                         "give e.g. 207 or 'golden retriever'") from None
    if not 0 <= idx <= 999:
        raise ValueError(f"class label must be an ImageNet class index 0..999, got {idx} ({NULL_CLASS} is the null "
                         "class that classifier-free guidance uses itself): give a class from 0 to 999")
    return idx


def class_label_text(idx: int) -> str:
    return f"{idx}: {imagenet_classes()[idx]}"


CLASS_INPUT = Input("class_label", "text", "ImageNet class", default="88: macaw",
                    choices=tuple(f"{i}: {n}" for i, n in enumerate(imagenet_classes())),
                    help="An ImageNet-1k class: pick its name, or type its index 0..999 (88 = macaw) or its name.")


def check_class(inputs: dict) -> None:
    class_index(inputs["class_label"])


def class_condition(parts, spec, request, generator=None) -> tuple[dict, dict | None]:
    """crossattn = ClassEmbedder(class) (B, 1, D); the unconditional branch is the null class 1000 where the
    embedder has it (cin256-v2), else there is none (cin256: CFG off). With CFG 1 the pipeline's guidance evaluates
    the conditional branch only."""
    emb = parts.text_encoders[0].embedding
    idx = class_index(request.inputs["class_label"])
    cond = {"crossattn": emb.weight[idx][None, None]}                  # (1, 1, D)
    uncond = {"crossattn": emb.weight[NULL_CLASS][None, None]} if emb.num_embeddings > NULL_CLASS else None
    return batched(cond, request.batch_size), (batched(uncond, request.batch_size) if uncond else None)


def no_condition(parts, spec, request, generator=None) -> tuple[dict, None]:
    """Unconditional: no crossattn, no vector, no concat, and no unconditional branch (CFG has nothing to do)."""
    return {}, None


def class_infotext(kw: dict) -> dict[str, str]:
    label = (kw.get("inputs") or {}).get("class_label", kw.get("class_label"))
    if label is None:
        return {}
    try:
        return {"Class label": class_label_text(class_index(label))}
    except ValueError:
        return {"Class label": str(label)}


# ------------------------------------------------------------------------------------------------ the table

# ------------------------------------------------------------------------------------------------ text (BERT)

VOCAB_MISSING = ("needs BERT's uncased WordPiece vocabulary (vocab.txt of bert-base-uncased): put vocab.txt beside the "
                 "checkpoint, in the models folder or its text_encoders/ folder, give --bert-vocab PATH, or run "
                 "`python -m sd download bert-vocab` where the Hugging Face hub is reachable")


def bert_text_parts(ckpt, spec, sources, device, dtype):
    """Load the text transformer (the file's `cond_stage_model.transformer.*`, its unused to_logits left out by rule)
    and attach the BERT tokenizer of the vocab.txt found by sd.ldm_bert.find_vocab (CheckpointError, one line, when
    there is none or it is not a BERT vocabulary)."""
    from ..ldm_bert import find_vocab, load_tokenizer
    from ..text import build_text_encoder, load_text_encoder_weights
    from ..text_encoders import TextSources, search_folders

    cfg = spec.text_encoders[0]
    sources = sources or TextSources()
    label = next((f.label for f in FAMILIES if f.name == spec.family), spec.family)
    try:
        path = find_vocab(ckpt.path, getattr(sources, "bert_vocab", None), search_folders(ckpt.path, sources))
        if path is None:
            raise CheckpointError(f"{label} {VOCAB_MISSING}")
        tokenizer = load_tokenizer(path, cfg.vocab_size)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None
    enc = build_text_encoder(cfg, device="meta")
    keys = [k for k in ckpt.shapes() if k.startswith(cfg.prefix) and ignore_reason(k) is None]
    load_text_encoder_weights(enc, {k[len(cfg.prefix):]: ckpt.get(k) for k in keys}, cfg)
    enc = enc.to(device=device, dtype=dtype).eval().requires_grad_(False)
    enc.tokenizer = tokenizer
    where = f"{path.parent.name}/{path.name}" if path.parent.name else path.name
    return SimpleNamespace(modules=(enc,), configs=(cfg,), notes=(f"tokenizer: BERT uncased WordPiece ({where})",))


def bert_condition(parts, spec, request, generator=None) -> tuple[dict, dict]:
    """crossattn = the text transformer's output (B, 77, D) of the prompt; the unconditional branch is the negative
    prompt ("" by default), encoded (LDM's scripts/txt2img.py: get_learned_conditioning([""]))."""
    from ..ldm_bert import encode

    enc = parts.text_encoders[0]
    cond, uncond = encode(enc, [request.prompt]), encode(enc, [request.negative_prompt or ""])   # (1, 77, D) each
    return batched({"crossattn": cond}, request.batch_size), batched({"crossattn": uncond}, request.batch_size)


# ------------------------------------------------------------------------------------------------ inpainting

INPAINT_CONCAT = (("masked_image", 3), ("mask", 1))   # scripts/inpaint.py: cat(cond_stage(masked image), mask)


def inpaint_extras(ckpt, spec, device, dtype) -> dict:
    """The cond stage (`cond_stage_model.*`): a VQ autoencoder of the first stage's config (the same object in the
    released file, saved twice), loaded strictly from its own tensors."""
    from ..vq import build_first_stage

    m = build_first_stage(spec.vae, device="meta")
    try:
        m.load_state_dict(ckpt.tensors(COND), strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"cond stage: {str(e).splitlines()[0][:300]}") from None
    return {"cond_stage": m.to(device=device, dtype=dtype).eval().requires_grad_(False)}


def inpaint_tensors(spec) -> dict[str, dict[str, tuple[int, ...]]]:
    from ..vq import build_first_stage

    return {"cond_stage": {COND + k: tuple(v.shape)
                           for k, v in build_first_stage(spec.vae, device="meta").state_dict().items()}}


def inpaint_condition(parts, spec, request, generator=None) -> tuple[dict, None]:
    """inpainting_big (scripts/inpaint.py): m = (mask / 255 >= 0.5) (white = repaint), masked image =
    (1 - m) * image in [0, 1], both then * 2 - 1; concat = [cond_stage.encode(masked image) (B, 3, h, w) (the
    pre-quantisation latent, no codebook lookup), F.interpolate(2m - 1, (h, w)) nearest (B, 1, h, w)]. No
    unconditional branch."""
    image = image_to_tensor(load_image(request.inputs["image"], "image"))   # (1, 3, H, W) in [-1, 1]
    m = mask_to_tensor(load_image(request.inputs["mask"], "mask"))          # (1, 1, H, W) in {0, 1}
    masked = torch.where(m > 0.5, torch.full_like(image, -1.0), image)     # (1 - m) * x01 * 2 - 1
    stage = parts.extras["cond_stage"]
    p = next(stage.parameters())
    with torch.no_grad():
        c = stage.encode(masked.to(p.device, p.dtype)).float()             # (1, 3, h, w)
    cc = F.interpolate(2 * m - 1, size=c.shape[-2:]).to(c.device)          # (1, 1, h, w)
    return batched({"concat": torch.cat([c, cc], dim=1)}, request.batch_size), None


_COMMON = dict(tab="ldm", default_size=256, empty_negative="encode", sigmas_buffer="alphas_cumprod",
               latent_from_file=file_scale, unet_ema=True)
# The checkpoint card's words (sd.card): what each LDM ("SD v0", Rombach et al. 2022) model is.
_LDM = "the original latent diffusion model: a UNet denoising in a pretrained autoencoder's latent space"
_CLASS_WORDS = (("crossattn", "the learned embedding of the ImageNet class (one token)"),)

LDM_UNCOND = Family(
    text=False,
    name="ldm-uncond-vq-f4", label="LDM unconditional 256 (CelebA-HQ / FFHQ / LSUN bedrooms)", matches=uncond,
    build=build_plain, latent=VQ_F4, condition=no_condition, schedule=(0.0015, 0.0195, 1000), preview=_GREY3,
    unet_config=_heads(per_head=32), preset="ldm-uncond", **_COMMON,
    about=_LDM + " (VQ-f4), unconditional", evidence=("!" + COND, "first_stage_model.quantize.embedding.weight"),
    notes=("celeba256, ffhq256 and lsun_beds256 share this layout; only their weights differ",),
)

LDM_CIN_V2 = Family(
    text=False,
    name="ldm-cin256-v2", label="LDM ImageNet 256 class-conditional (cin256-v2)", matches=classes,
    build=build_class, latent=VQ_F4, condition=class_condition, schedule=(0.0015, 0.0195, 1000), preview=_GREY3,
    unet_config=_heads(count=1), inputs=(CLASS_INPUT,), check=check_class, infotext=class_infotext,
    preset="ldm-cin256-v2", **_COMMON,
    about=_LDM + " (VQ-f4), conditioned on an ImageNet class through cross-attention (class 1000 = none: CFG)",
    evidence=(CLASS_KEY, "first_stage_model.quantize.embedding.weight"), conditioning=_CLASS_WORDS,
)

LDM_CIN = Family(
    text=False,
    name="ldm-cin256", label="LDM ImageNet 256 class-conditional (cin256, VQ-f8)", matches=classes,
    build=build_class, latent=VQ_F8, condition=class_condition, schedule=(0.0015, 0.0195, 1000), preview=_GREY4,
    unet_config=_heads(per_head=32), inputs=(CLASS_INPUT,), check=check_class, infotext=class_infotext,
    preset="ldm-cin256", **_COMMON,
    about=_LDM + " (VQ-f8), conditioned on an ImageNet class through cross-attention",
    evidence=(CLASS_KEY, "first_stage_model.quantize.embedding.weight"), conditioning=_CLASS_WORDS,
    notes=("trained without the null class: classifier-free guidance is not available (the CFG scale is unused)",),
)

# the x-transformers TransformerWrapper's own names (never a CLIP tower's `cond_stage_model.transformer.text_model.`)
_BERT_PREFIXES = tuple(COND + "transformer." + p for p in ("token_emb.", "pos_emb.", "attn_layers.", "norm.",
                                                                     "to_logits."))

SR_INPUTS = (
    Input("image", "image", "Low-res image", required=True, cli="--init-image", scale=4,
          help="RGB image to upscale 4x (the output is 4x its size); bsr_sr was trained on degraded 64x64 crops."),
)


def sr_condition(parts, spec, request, generator=None) -> tuple[dict, None]:
    """bsr_sr (conditioning_key concat, cond stage Identity): the low-res image in [-1, 1] at its own size, which is
    the latent size (output / 4, VQ-f4), appended to the latent: concat (B, 3, h, w). No unconditional branch."""
    lr = image_to_tensor(load_image(request.inputs["image"], "image"))    # (1, 3, h, w) in [-1, 1]
    return batched({"concat": lr}, request.batch_size), None


LDM_BSR = Family(
    text=False,
    name="ldm-bsr-sr", label="LDM super-resolution 4x (bsr_sr)", matches=uncond, build=build_plain, latent=VQ_F4,
    concat=(("low_res", 3),), schedule=(0.0015, 0.0155, 1000), preview=_GREY3, unet_config=_heads(per_head=32),
    condition=sr_condition, inputs=SR_INPUTS, preset="ldm-bsr-sr", **_COMMON,
    about=_LDM + " (VQ-f4) for 4x super-resolution: the low-res image is appended to the latent",
    evidence=("!" + COND, "first_stage_model.quantize.embedding.weight"),
    conditioning=(("concat", "the low-resolution RGB image in [-1, 1] (3 channels) at the latent size"),),
)

LDM_SEMANTIC = Family(
    text=False,
    name="ldm-semantic", label="LDM semantic synthesis (segmentation map to image)", matches=semantic,
    build=build_plain, latent=VQ_F4, concat=(("segmentation", 3),), schedule=(0.0015, 0.0205, 1000),
    preview=_GREY3, unet_config=_heads(count=8), preset="ldm-waiting",
    parts=((MAPPER.rsplit(".", 1)[0] + ".", "segmentation channel mapper (semantic synthesis not run yet)"),),
    unsupported="not run yet: needs a segmentation map", **_COMMON,
    about=_LDM + " (VQ-f4) from a segmentation map", evidence=(MAPPER,),
)

LDM_TXT_F8 = Family(
    name="ldm-txt2img-f8-large", label="LDM text-to-image (txt2img-f8-large, KL-f8)",
    matches=bert(True, _kl), build=build_text, latent=KL_F8, schedule=(0.00085, 0.012, 1000), preview=_SD_RGB4,
    unet_config=_heads(count=8), condition=bert_condition, text_parts=bert_text_parts, preset="ldm-txt2img",
    evidence=(BERT,),
    about=_LDM + " (KL-f8) with its own BERT-like text transformer; the direct ancestor of SD 1.x",
    **_COMMON,
)

LDM_TXT_256 = Family(
    name="ldm-text2img256", label="LDM text-to-image 256 (text2img256, VQ-f4)", matches=bert(True, _vq),
    build=build_text, latent=VQ_F4, schedule=(0.0015, 0.0195, 1000), preview=_GREY3, unet_config=_heads(per_head=32),
    condition=bert_condition, text_parts=bert_text_parts, preset="ldm-txt2img", evidence=(BERT,),
    about=_LDM + " (VQ-f4) with its own BERT-like text transformer, at 256 px",
    **_COMMON,
)

LDM_LAYOUT = Family(
    name="ldm-layout2img", label="LDM layout-to-image (OpenImages 256)", matches=bert(False, _vq), build=build_plain,
    latent=VQ_F4, schedule=(0.0015, 0.0205, 1000), preview=_GREY3, unet_config=_heads(per_head=32),
    preset="ldm-waiting", parts=tuple((p, "bounding-box token transformer (layout-to-image not run yet)")
                                      for p in _BERT_PREFIXES),
    unsupported="not run yet: needs a layout (bounding boxes and their classes)", **_COMMON,
    about=_LDM + " (VQ-f4) from a layout of boxes and classes", evidence=(BERT,),
)

LDM_RDM = Family(
    text=False,
    name="ldm-rdm", label="LDM retrieval-augmented 768 (rdm_768x768)", matches=rdm, build=build_plain,
    latent=KL_F16, schedule=(0.0015, 0.015, 1000), preview=_GREY16, unet_config=_heads(per_head=32),
    preset="ldm-waiting", unsupported="not run yet: needs a retrieval database (CLIP nearest neighbours)", **_COMMON,
    about=_LDM + " (KL-f16) conditioned on retrieved CLIP neighbours", evidence=("!" + COND,),
)

LDM_CHURCHES = Family(
    text=False,
    name="ldm-uncond-kl-f8", label="LDM unconditional 256 (LSUN churches, KL-f8)", matches=uncond_kl,
    build=build_plain, latent=KL_F8_STD, condition=no_condition, schedule=(0.0015, 0.0155, 1000), preview=_GREY4,
    unet_config=_heads(count=8), preset="ldm-uncond-kl", **_COMMON,
    about=_LDM + " (KL-f8), unconditional, with scale-shift-norm ResBlocks",
    evidence=("!" + COND, "!first_stage_model.quantize.embedding.weight"),
    notes=("scale-shift-norm ResBlocks with resblock_updown; the latent scale is the file's scale_factor buffer",),
)

LDM_INPAINT = Family(
    text=False,
    name="ldm-inpainting-big", label="LDM inpainting (inpainting_big, VQ-f4)", matches=first_stage_cond,
    build=build_plain, latent=VQ_F4, concat=INPAINT_CONCAT, schedule=(0.0015, 0.0205, 1000), preview=_GREY3,
    unet_config=_heads(count=8), condition=inpaint_condition, inputs=INPAINT_INPUTS, check=inpaint_check,
    extras=inpaint_extras, extra_tensors=inpaint_tensors, preset="ldm-inpainting", **_COMMON,
    about=_LDM + " (VQ-f4) for inpainting: the masked image, through a copy of the first stage, and the mask are "
          "appended to the latent", evidence=(COND_VQ, "first_stage_model.quantize.embedding.weight"),
    conditioning=(("concat", "the masked image's latent from the cond stage (a copy of the first stage) and the "
                             "mask, at the latent size"),),
    notes=("returns the model's output everywhere (scripts/inpaint.py pastes the original back outside the mask)",),
)

FAMILIES = (LDM_UNCOND, LDM_CIN_V2, LDM_CIN, LDM_BSR, LDM_SEMANTIC, LDM_TXT_F8, LDM_TXT_256, LDM_LAYOUT, LDM_RDM,
            LDM_CHURCHES, LDM_INPAINT)
