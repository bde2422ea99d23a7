"""Frozen configuration dataclasses shared by the whole engine.

Every number here is read from a checkpoint's tensor shapes by `sd.detect` (never from a file name);
the few facts shapes cannot tell (prediction type) come from presets, a user override or a probe.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UNetConfig:
    """The LDM / SGM `openaimodel.UNetModel` (SD1, SD2 and its variants, SDXL)."""

    in_channels: int = 4                       # 4 latent; 9 inpaint; 5 depth; 7 x4 upscaler
    out_channels: int = 4
    model_channels: int = 320                  # width of level 0 ("mc")
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # width of level i = mc * mult[i]
    num_res_blocks: int = 2                    # ResBlocks per level on the way down (up: +1)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # SpatialTransformer depth per level, 0 = none
    transformer_depth_middle: int = 1          # depth of middle_block.1
    context_dim: int = 768                     # cross-attention key/value width (text hidden size)
    num_heads: int = 8                         # used when num_head_channels == -1 (SD1: 8 heads)
    num_head_channels: int = -1                # > 0: heads = channels // this (SD2, SDXL: 64)
    use_linear_in_transformer: bool = False    # proj_in/proj_out Linear (SD2, SDXL) or 1x1 conv (SD1)
    adm_in_channels: int = 0                   # label_emb.0 = Seq(Linear(adm, 4mc), SiLU, Linear): SDXL, unCLIP
    num_classes: int = 0                       # label_emb = Embedding(num_classes, 4mc): x4 upscaler noise level
    disable_self_attn: tuple[bool, ...] = ()   # per level: attn1 attends to the context too (x4 upscaler)
    legacy_attention: bool = False             # openaimodel's AttentionBlock (GroupNorm, qkv conv1d, proj_out)
                                               # instead of the SpatialTransformer, where transformer_depth > 0
                                               # (unconditional / super-resolution LDMs: `input_blocks.N.1.qkv`)
    use_scale_shift_norm: bool = False         # ResBlock emb_layers give (scale, shift): h = norm(h) * (1 + scale)
                                               # + shift (openaimodel; LDM lsun_churches256: emb_layers.1 is 2C wide)
    resblock_updown: bool = False              # down/upsampling by ResBlocks (avg-pool / nearest inside the block)
                                               # instead of Downsample / Upsample (LDM churches, inpainting_big)

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of an attention layer of this width."""
        if self.num_head_channels > 0:
            return max(1, channels // self.num_head_channels), min(channels, self.num_head_channels)
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """The LDM first stage `AutoencoderKL` (encoder/decoder with a mid attention block)."""

    ch: int = 128                              # base width
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)    # downsampling factor = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2
    z_channels: int = 4                        # latent channels (SD3: 16)
    embed_dim: int = 4                         # after quant_conv; equals z_channels for SD
    in_channels: int = 3
    out_channels: int = 3
    use_quant_conv: bool = True                # SD3 VAE has no quant_conv / post_quant_conv
    attn_levels: tuple[int, ...] = ()          # levels with AttnBlocks inside (down[i].attn / up[i].attn): LDM's
                                               # kl-f16/f32 and vq-f8/f16 first stages; SD's VAEs have none
    mid_attn: bool = True                      # mid.attn_1 present (LDM vq-f4-noattn: attn_type "none")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class VQConfig(VAEConfig):
    """taming-transformers' VQModel (Esser et al. 2021), also LDM's VQ first stages (Rombach et al. 2022): the
    same encoder/decoder with a single z (no double_z), quant_conv z -> embed_dim, a codebook of n_embed rows."""

    n_embed: int = 16384                       # codebook rows (quantize.embedding.weight (n_embed, embed_dim))


@dataclass(frozen=True)
class TextEncoderConfig:
    """One text tower. `naming` says how its checkpoint keys are spelled.

    naming: "hf"       transformers CLIPTextModel names (SD1 CLIP-L, SDXL embedders.0)
            "openclip" OpenCLIP names (SD2 ViT-H, SDXL bigG): token_embedding, transformer.resblocks.N...
    """

    naming: str = "hf"
    prefix: str = "cond_stage_model.transformer."  # checkpoint prefix up to the tower's own names
    width: int = 768
    layers: int = 12
    heads: int = 12                            # CLIP/OpenCLIP text towers: width // 64
    mlp: int = 3072
    act: str = "quick_gelu"                    # quick_gelu (CLIP-L) or gelu (OpenCLIP H / bigG)
    vocab_size: int = 49408
    context_length: int = 77
    projection_dim: int = 0                    # text_projection output width, 0 = none in the file
    pad_token: int = 49407                     # CLIP-L pads with EOT (49407); OpenCLIP pads with 0
    layer: str = "last"                        # "last" or "penultimate" (= hidden_states[-2])
    final_ln: bool = True                      # apply the final LayerNorm to the chosen layer
    output_pooled: bool = False                # SDXL bigG: pooled (EOT token, projected) is used too
    clip_skip_opt_in: bool = False             # fixed to `layer`, but a request's opt-in (A1111 "Clip skip SDXL",
                                               # GenerateParams.sdxl_clip_l_skip) makes clip skip k take
                                               # hidden_states[-k]; set by the family (SDXL's CLIP-L)


@dataclass(frozen=True)
class LatentFormat:
    """How the VAE latent is scaled before diffusion: `z_diff = (z - shift) * scale`. Each family declares its own
    (`sd.families`, the one source of these numbers)."""

    scale: float = 0.18215
    shift: float = 0.0
    channels: int = 4
    factor: int = 8


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build and run one checkpoint, as detected from its keys and shapes."""

    family: str                                # sd1, sd1-inpaint, sd2, sd2-inpaint, sd2-depth, sd2-x4-upscaler,
                                               # sd2-unclip-h, sd2-unclip-l, sdxl-base, sdxl-refiner, sdxl-inpaint
    unet: UNetConfig
    vae: VAEConfig | None                      # None when the file carries no first stage
    text_encoders: tuple[TextEncoderConfig, ...]
    latent: LatentFormat
    prediction: str = "eps"                    # eps or v
    prediction_source: str = "default"         # what decided it: override / preset / probe / marker key / default
    unet_prefix: str = "model.diffusion_model."
    vae_prefix: str = "first_stage_model."
    unsupported: tuple[str, ...] = ()          # parts present in the file that this engine does not run yet
    notes: tuple[str, ...] = field(default=())
    extra: tuple[tuple[str, object], ...] = ()   # numbers of the family's own parts read from shapes, by name
                                               # (Family.extra_config; unCLIP: the image tower's VisionConfig)
    network: str = "unet"                      # "unet": `unet` is a UNetConfig; "mmdit" (SD3 / 3.5): `unet` is the
                                               # sd.mmdit.MMDiTConfig (also in/out_channels, context_dim, adm width)
