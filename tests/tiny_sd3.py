"""Tiny SD3 / SD3.5 checkpoints in the released key layouts (tests/data/checkpoint-keys/sd3*.json), random weights.

The structure of each layout is kept and the widths shrunk: the MMDiT keeps 64 channels per head and
hidden = 64 * depth (so depth 2-4), its last context block pre-only, SD3.5's RMS qk-norm, and 3.5 medium's
MMDiT-X attn2 in the same leading share of the blocks as the release (13 of 24 -> 2 of 4); the pos_embed table
is 16 x 16 patches of random values (not a sin-cos table: a model that recomputed it would fail parity).
The 16-channel VAE has base width 32; CLIP-L / CLIP-G are 2 layers of 32 channels (the real 49408-token
vocabulary), T5 2 blocks of 96 channels over a tiny sentencepiece vocabulary trained here.
Only sd3_medium bundles the text encoders (as sd3_medium_incl_clips + T5 does); `tiny_text_tensors` gives
them for the other layouts.
"""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import torch

from sd.config import VAEConfig
from sd.mmdit import MMDiT, MMDiTConfig, mmdit_config_for
from sd.sd3_text import CLIP_G_PREFIX, CLIP_L_PREFIX, T5_PREFIX, clip_g_sd3_config, clip_l_sd3_config
from sd.t5 import T5Config, build_t5
from sd.text import build_text_encoder
from sd.vae import AutoencoderKL

KEYS = Path(__file__).parent / "data" / "checkpoint-keys"
LAYOUTS = ("sd3_medium", "sd35_large", "sd35_medium")
TINY_DEPTH = {"sd3_medium": 2, "sd35_large": 3, "sd35_medium": 4}
CLIP_WIDTH = 32           # CLIP-L and CLIP-G width: adm = 64
T5_WIDTH = 96             # T5 d_model = the MMDiT context width
POS_MAX = 16              # pos_embed: 16 x 16 patches
TINY_VAE = VAEConfig(ch=32, z_channels=16, embed_dim=16, use_quant_conv=False)
WORDS = ("a photo of an astronaut riding a horse on the moon red green blue cat dog small large circle "
         "square background painting of the city at night").split()


def reference(name: str) -> dict:
    return json.loads((KEYS / f"{name}.json").read_text())


def reference_shapes(name: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in reference(name)["tensors"].items()}


def tiny_mmdit_config(name: str) -> MMDiTConfig:
    ref = mmdit_config_for(reference_shapes(name))
    depth = TINY_DEPTH[name]
    n_dual = len(ref.x_block_self_attn_layers) * depth // ref.depth
    return dataclasses.replace(ref, depth=depth, pos_embed_max_size=POS_MAX, adm_in_channels=2 * CLIP_WIDTH,
                               context_dim=T5_WIDTH, mlp_hidden=4 * 64 * depth,
                               x_block_self_attn_layers=tuple(range(n_dual)))


def tiny_clip_configs():
    l = dataclasses.replace(clip_l_sd3_config(), width=CLIP_WIDTH, layers=2, heads=1, mlp=2 * CLIP_WIDTH)
    g = dataclasses.replace(clip_g_sd3_config(), width=CLIP_WIDTH, layers=2, heads=1, mlp=2 * CLIP_WIDTH,
                            projection_dim=CLIP_WIDTH)
    return l, g


def tiny_t5_config(vocab_size: int) -> T5Config:
    return T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=16, d_ff=128, num_layers=2, num_heads=3)


def _perturb(sd: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Default inits leave norms at 1 and biases at 0: make every tensor matter."""
    out = {}
    for k, v in sd.items():
        v = v.detach().float().clone()
        if v.ndim <= 1:
            v = v + 0.1 * torch.randn(v.shape, generator=g)
        out[k] = v.contiguous()
    return out


def tiny_mmdit_tensors(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = _perturb(MMDiT(tiny_mmdit_config(name)).state_dict(), g)
    sd["pos_embed"] = torch.randn(sd["pos_embed"].shape, generator=g)
    return {"model.diffusion_model." + k: v for k, v in sd.items()}


def tiny_vae_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed + 2)
    sd = _perturb(AutoencoderKL(TINY_VAE).state_dict(), torch.Generator().manual_seed(seed + 3))
    return {"first_stage_model." + k: v for k, v in sd.items()}


def write_tiny_spiece(path: Path) -> Path:
    """A 48-piece unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2)."""
    import sentencepiece as spm

    sentences = [" ".join(WORDS[i:i + 7]) for i in range(len(WORDS))] * 20
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buf, vocab_size=48,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", minloglevel=2,
                                   num_threads=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path


def write_tokenizer_json(spiece: Path, path: Path) -> Path:
    """The same vocabulary as a tokenizers `tokenizer.json` (Unigram + Metaspace, as T5's fast tokenizer)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.save(str(path))
    return path


def tiny_text_tensors(seed: int = 0, vocab_size: int = 48) -> dict[str, torch.Tensor]:
    """CLIP-L (with the bundles' unused text_projection), CLIP-G and T5 under the all-in-one prefixes."""
    g = torch.Generator().manual_seed(seed + 4)
    out: dict[str, torch.Tensor] = {}
    lcfg, gcfg = tiny_clip_configs()
    for cfg, prefix in ((lcfg, CLIP_L_PREFIX), (gcfg, CLIP_G_PREFIX)):
        torch.manual_seed(seed + 5 + len(out))
        sd = _perturb(build_text_encoder(cfg).state_dict(), g)
        out.update({prefix + k: v for k, v in sd.items() if not k.endswith("position_ids")})
        out[prefix.removesuffix("transformer.") + "logit_scale"] = torch.tensor(4.6052)
    out[CLIP_L_PREFIX + "text_projection.weight"] = torch.eye(CLIP_WIDTH)  # present in bundles, never used
    torch.manual_seed(seed + 9)
    sd = _perturb(build_t5(tiny_t5_config(vocab_size)).state_dict(), g)
    sd.pop("encoder.embed_tokens.weight")  # the bundles name the embedding shared.weight only
    out.update({T5_PREFIX + k: v for k, v in sd.items()})
    out["text_encoders.t5xxl.logit_scale"] = torch.tensor(4.6052)
    return out


def tiny_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = {**tiny_mmdit_tensors(name, seed), **tiny_vae_tensors(seed)}
    if name == "sd3_medium":
        sd.update(tiny_text_tensors(seed))
    return sd


def write_tiny_sd3(name: str, path: Path, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tiny_state_dict(name, seed), str(path))
    return path
