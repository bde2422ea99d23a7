"""The two small frozen dataclasses every family module fills in: `Family` (one per model family) and `Input`
(one per extra request input a family takes beyond the common ones).

A family is the unit a user thinks in (sd1, sd2-inpaint, sdxl-refiner ...), so everything the engine must know
about it is declared here, in one value, and nothing outside `sd/families/` tests family names. The shape follows
ComfyUI's `supported_models.py` (one declaration per model, numbers read from shapes) without its class hierarchy,
and SGM's `GeneralConditioner` output (`crossattn` / `vector` / `concat`) without its import strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import LatentFormat, ModelSpec, TextEncoderConfig, UNetConfig, VAEConfig

Shapes = dict[str, tuple[int, ...]]
INPUT_KINDS = ("image", "mask", "number", "choice", "text", "bool")


@dataclass(frozen=True)
class Input:
    """One extra request input (GenerateParams.inputs[name]); the CLI flags and the app's form are built from it."""

    name: str                                  # key in GenerateParams.inputs (and the app's API parameter name)
    kind: str                                  # image | mask | number | choice | text | bool
    label: str                                 # what a form shows
    default: Any = None                        # used when the request leaves it out (None: no value)
    min: float | None = None                   # number: bounds (inclusive)
    max: float | None = None
    choices: tuple[str, ...] = ()              # choice: the allowed values; text: suggestions (a dropdown that
                                               # also takes a typed value: the ImageNet class picker)
    required: bool = False                     # a request without it is refused (ValueError naming it)
    help: str = ""                             # one sentence for tooltips and --help
    cli: str = ""                              # CLI flag; "" = "--" + name with dashes
    scale: int = 1                             # image: output side = scale x the image's side (x4 upscaler: 4);
                                               # 0: any size (the family resizes it: unCLIP's image, a depth map)

    def __post_init__(self):
        assert self.kind in INPUT_KINDS, f"{self.name}: unknown input kind {self.kind!r}"

    @property
    def flag(self) -> str:
        return self.cli or "--" + self.name.replace("_", "-")


Matcher = Callable[[Shapes, UNetConfig], bool]
Builder = Callable[[Shapes, UNetConfig], tuple[VAEConfig | None, tuple[TextEncoderConfig, ...]]]
# condition(parts, spec, request, generator) -> (cond, uncond): dicts of crossattn (B, T, D), vector (B, A) and
# concat (B, C, h, w); `parts` has .text_encoders and .vae, `request` is a GenerateParams (duck-typed: no import).
Conditioner = Callable[[Any, ModelSpec, Any, Any], tuple[dict, dict]]


@dataclass(frozen=True)
class Family:
    """Everything the engine knows about one model family."""

    name: str                                  # ModelSpec.family, preset and infotext key ("sd2-inpaint")
    label: str                                 # human name ("SD 2 inpainting")
    tab: str                                   # app tab id: "sd1" / "sd2" / "sdxl" / "inpaint" / "variants"
    matches: Matcher                           # structure test on {key: shape} (+ the UNet read from it); the
                                               # table's matchers are mutually exclusive (tests/test_families.py)
    build: Builder                             # (VAE, text towers) read from shapes
    latent: LatentFormat                       # the one source of the latent scale/shift/channels/factor
    condition: Conditioner | None = None       # None: detected and loaded but not runnable yet
    concat: tuple[tuple[str, int], ...] = ()   # channels appended to the latent, in order ("mask", 1), ...;
                                               # latent.channels + sum == UNet in_channels (checked at detection)
    vector_width: Callable[[tuple[TextEncoderConfig, ...], UNetConfig], int] | None = None
                                               # expected UNet adm width; None: the UNet takes no vector
    empty_negative: str = "encode"             # "encode": "" is run through the towers; "zeros" (SDXL, as SGM)
    inputs: tuple[Input, ...] = ()             # extra request inputs (GenerateParams.inputs, validated)
    options: tuple[Input, ...] = ()            # options applied around the model by the caller with sd.inpaint's
                                               # functions (mask blur, only masked, paste back); never passed to
                                               # generate, recorded in the infotext
    check: Callable[[dict], None] | None = None  # completed inputs -> raises ValueError saying what to change
    schedule: tuple[float, float, int] = (0.00085, 0.012, 1000)  # LDM "linear" betas when the file has none
    default_size: int = 512                    # side trained at
    v_size: int | None = None                  # side of the v-prediction variant of the same layout (SD 2: 768)
    refines: tuple[str, ...] = ()              # families whose latents this one may continue (SDXL refiner)
    unet_config: Callable[[Shapes, UNetConfig], UNetConfig] | None = None
                                               # the UNet numbers shapes cannot tell, from the released config
                                               # (LDM attention heads); applied once the family is chosen
    text: bool = True                          # takes a prompt; False (LDM unconditional / class / SR models):
                                               # a non-empty prompt is ignored with a warning, not an error
    sigmas_buffer: str = "betas"               # which schedule buffer of the file gives the training sigmas:
                                               # "betas" (SD) or "alphas_cumprod" (LDM, as k-diffusion's CompVisDenoiser)
    preview: tuple[tuple[tuple[float, ...], ...], tuple[float, ...]] = ((), ())  # latent->RGB (C, 3) and bias (3,)
    infotext: Callable[[dict], dict[str, str]] | None = None  # build_parameters kwargs -> extra A1111 fields
    extras: Callable[[Any, ModelSpec, Any, Any], dict] | None = None  # (checkpoint, spec, device, dtype) ->
                                               # {name: module or tensor}: the family's own parts, loaded with the
                                               # rest into Components.extras (x4: the low-res noise schedule)
    extra_tensors: Callable[[ModelSpec], dict[str, dict[str, tuple[int, ...]]]] | None = None
                                               # component -> {full key: shape} the extras load (key accounting)
    img2img: Callable[[Any, ModelSpec, Any, Any], tuple[Any, float]] | None = None
                                               # (parts, spec, request, generator) -> (z0 (1, C, h, w), strength):
                                               # the family's own img2img start (depth), drawn before the noise
    extra_config: Callable[[Shapes], tuple[tuple[str, Any], ...]] | None = None
                                               # shapes -> ModelSpec.extra: numbers of the family's own parts
    tile: int = 0                              # latent side (px) above which the pipeline runs the UNet in
                                               # overlapping tiles (x4: 512, the low-res image's side); 0 = never
    preset: str = ""                           # presets/<name>.json ("" = the family name)
    preset_v: str = ""                         # the preset when the prediction is v ("" = preset)
    parts: tuple[tuple[str, str], ...] = ()    # extra checkpoint parts (prefix, what) the engine does not run yet
    unsupported: str = ""                      # why a request is refused when condition is None
    notes: tuple[str, ...] = field(default=())
    # --- families whose network is not the LDM UNet, or whose text towers may be separate files (SD3 / SD3.5)
    network: str = "unet"                      # "unet" (sd.unet.UNetModel) or "mmdit" (sd.mmdit.MMDiT): which
                                               # network detection reads from shapes, the loader builds and the
                                               # pipeline calls; matchers and builders get that network's config
    text_parts: Callable[[Any, ModelSpec, Any, Any, Any], Any] | None = None
                                               # (checkpoint, spec, sources, device, dtype) -> an object with
                                               # .modules, .configs, .notes: the family loads its own text towers
                                               # (from the file or separate files); None: spec.text_encoders
    text_tensors: Callable[[Shapes], dict[str, dict[str, tuple[int, ...]]]] | None = None
                                               # component -> {full key: shape} of the file's text tensors that
                                               # text_parts loads beyond spec.text_encoders (key accounting: T5)
    sigmas_for: Callable[[str, int, dict], Any] | None = None
                                               # (schedule, steps, inputs) -> (steps + 1,) sampler sigmas: flow
                                               # families (shift from the request); None: the training sigmas
    guidance: Callable[..., Any] | None = None  # (denoise, cond, uncond, request, sigmas, spec) -> D(x, sigma):
                                               # the family's guidance (SD3.5: CFG + skip-layer); None: CFG
    request_notes: Callable[[Any, ModelSpec, Any], tuple[str, ...]] | None = None
                                               # (parts, spec, request) -> plain-words notes shown with a result
    prepare: Callable[[Any, ModelSpec, Any], tuple[dict, tuple]] | None = None
                                               # (parts, spec, request with completed inputs) -> (inputs, shown):
                                               # inputs the family fills from its own parts before the run (depth:
                                               # the MiDaS estimate when no map is given) and (caption, image) pairs
                                               # shown with the result (the depth map used)
    latent_from_file: Callable[[Any, LatentFormat], tuple[LatentFormat, str]] | None = None
                                               # (checkpoint, the declared latent) -> (the latent this file uses,
                                               # a note): LDM's `scale_factor` buffer (scale_by_std models)
    unet_ema: bool = False                     # the UNet's weights from the file's complete EMA copy where it has
                                               # one (LDM's model_ema.*: the released LDMs are sampled in ema_scope)
    ays_table: str = "sd1"                     # which of NVIDIA's Align Your Steps tables the "Align Your Steps"
                                               # schedule uses (sd.schedules.AYS_TABLES; A1111: "sdxl" for SDXL)
    # --- the checkpoint card (sd.card): plain words a learner can follow
    about: str = ""                            # what the family is and what it adds over the one before (one line)
    evidence: tuple[str, ...] = ()             # the checkpoint keys (or prefixes, ending in ".") its matcher reads;
                                               # a key prefixed "!" counts by its absence
    conditioning: tuple[tuple[str, str], ...] = ()  # (crossattn / vector / concat / class, what it holds in words)

    @property
    def runs(self) -> bool:
        return self.condition is not None

    def concat_channels(self) -> int:
        return sum(c for _, c in self.concat)

    def size_for(self, prediction: str | None) -> int:
        return self.v_size if prediction == "v" and self.v_size else self.default_size

    def preset_for(self, prediction: str | None) -> str:
        base = self.preset or self.name
        return (self.preset_v or base) if prediction == "v" else base
