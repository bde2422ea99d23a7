"""AUTOMATIC1111's `parameters` text: build it for our PNGs, parse it back (also from A1111's own images).

The format (A1111 `modules/infotext_utils.py`): the prompt (any number of lines), then an optional line starting
`Negative prompt: `, then one line of `Key: value` pairs separated by `, ` such as
`Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: 0123456789,
Model: v1-5-pruned-emaonly`. Values holding `,`, `:` or a newline are JSON-quoted. Sizes are `WIDTHxHEIGHT`.
Each family adds its own fields (its `infotext` in `sd.families`): SDXL `SDXL original size`, `SDXL crop top`,
`SDXL crop left`, `SDXL target size`; the refiner `Aesthetic score`, `Negative aesthetic score`; the inpainting
families A1111's `Mask blur`, `Masked content`, `Inpaint area`, `Masked area padding`; the x4 upscaler and
unCLIP `Noise level`; depth-to-image `Denoising strength`. The base -> refiner hand-off
writes A1111's `Refiner: name [hash]`, `Refiner switch at`.

Images are written by `save_png` with the text in a PNG `tEXt` chunk named `parameters`, to a fresh file name
(`NNNNN-SEED.png`, created exclusively so two runs never overwrite one another).
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .samplers import DISPLAY_NAMES, resolve_schedule, sampler_from_display
from .schedules import SCHEDULE_DISPLAY_NAMES, schedule_key

RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param_code
RE_SIZE = re.compile(r"^(\d+)x(\d+)$")
VERSION = "sd-playground"


def quote(text) -> str:
    """A1111's quote(): JSON-quote a value only when it holds `,`, `:` or a newline."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def num(v: float | int) -> str:
    """7.0 -> "7", 0.85 -> "0.85" (A1111 writes CFG 7 as 7)."""
    v = float(v)
    return str(int(v)) if v.is_integer() else f"{v:g}"


def build_parameters(*, prompt: str, negative_prompt: str, steps: int, sampler: str, schedule: str, cfg: float,
                     seed: int, width: int, height: int, model_name: str, model_hash: str | None,
                     family: str = "sd1", denoising_strength: float | None = None, clip_skip: int = 1,
                     sdxl_original_size: tuple[int, int] | None = None, sdxl_crop: tuple[int, int] = (0, 0),
                     sdxl_target_size: tuple[int, int] | None = None, aesthetic_score: float | None = None,
                     negative_aesthetic_score: float | None = None, refiner: str | None = None,
                     refiner_hash: str | None = None, refiner_switch_at: float | None = None,
                     batch_size: int = 1, mask_blur: float | None = None,
                     masked_content: str | None = None, inpaint_area: str | None = None,
                     masked_padding: int | None = None, inputs: dict | None = None,
                     extra_fields: dict | None = None) -> str:
    """The `parameters` text of one image. `sampler`/`schedule` are internal names (written as A1111 shows them);
    SDXL sizes are (height, width) like GenerateParams and written WIDTHxHEIGHT like `Size`. The family's own
    fields come from its `infotext` (keyword arguments it does not use are ignored), which also sees the request's
    family `inputs` (GenerateParams.inputs: the noise level, the depth strength ...). `seed` is the image's own
    (s + i for image i of a batch), so A1111's "Batch pos" is not written: the seed alone reproduces the image; a
    schedule "automatic" is written as the one it resolved to for the sampler."""
    kw = dict(width=width, height=height, sdxl_original_size=sdxl_original_size, sdxl_crop=sdxl_crop,
              sdxl_target_size=sdxl_target_size, aesthetic_score=aesthetic_score,
              negative_aesthetic_score=negative_aesthetic_score, mask_blur=mask_blur, masked_content=masked_content,
              inpaint_area=inpaint_area, masked_padding=masked_padding)
    kw = {**(inputs or {}), **kw}
    fields: dict[str, str] = {
        "Steps": str(int(steps)),
        "Sampler": DISPLAY_NAMES.get(sampler, sampler),
        "Schedule type": SCHEDULE_DISPLAY_NAMES.get(_resolved(schedule, sampler), schedule),
        "CFG scale": num(cfg),
        "Seed": str(int(seed)),
        "Size": f"{int(width)}x{int(height)}",
    }
    if model_hash:
        fields["Model hash"] = model_hash
    fields["Model"] = model_name
    if batch_size > 1:
        fields["Batch size"] = str(batch_size)
    if denoising_strength is not None:
        fields["Denoising strength"] = num(denoising_strength)
    if clip_skip != 1:
        fields["Clip skip"] = str(clip_skip)
    fields.update(_family_fields(family, kw))
    if refiner and "Aesthetic score" not in fields:
        fields["Aesthetic score"] = num(6.0 if aesthetic_score is None else aesthetic_score)
        fields["Negative aesthetic score"] = num(2.5 if negative_aesthetic_score is None else negative_aesthetic_score)
    if refiner:
        fields["Refiner"] = f"{refiner} [{refiner_hash}]" if refiner_hash else refiner
        fields["Refiner switch at"] = num(refiner_switch_at if refiner_switch_at is not None else 0.8)
    fields.update({k: str(v) for k, v in (extra_fields or {}).items()})  # GenerateResult.info["infotext"]: Lora hashes ...
    fields["Version"] = VERSION
    text = prompt
    if negative_prompt:
        text += f"\nNegative prompt: {negative_prompt}"
    return text + "\n" + ", ".join(f"{k}: {quote(v)}" for k, v in fields.items())


def _family_fields(family: str, kw: dict) -> dict[str, str]:
    from .families import get_family

    try:
        fam = get_family(family)
    except KeyError:
        return {}
    return fam.infotext(kw) if fam.infotext else {}


def parse_parameters(text: str) -> dict[str, str]:
    """A1111's parse_generation_parameters (without its option back-compat): raw strings by field name, with
    "Prompt", "Negative prompt", and sizes split into "Size-1" (width) / "Size-2" (height)."""
    res: dict[str, str] = {}
    prompt, negative, in_negative = "", "", False
    *lines, last = text.strip().split("\n")
    if len(RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[16:].strip()
        if in_negative:
            negative += ("" if not negative else "\n") + line
        else:
            prompt += ("" if not prompt else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative
    for k, v in RE_PARAM.findall(last):
        v = unquote(v.strip())
        m = RE_SIZE.match(v)
        if m:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def _resolved(schedule: str, sampler: str) -> str:
    try:
        return resolve_schedule(schedule, sampler)
    except ValueError:
        return schedule


def _schedule_of(parsed: dict[str, str], s: dict) -> None:
    """The schedule an A1111 infotext ran, into s["schedule"] (A1111 >= 1.9's reading, infotext_utils /
    sd_samplers.get_sampler_and_scheduler): its "Schedule type" label ("Automatic": the sampler's default); without
    one (A1111 < 1.9) a schedule suffix of the sampler name ("DPM++ 2M Karras"), else the sampler's default
    (sd.samplers.A1111_AUTOMATIC: DPM++ 2M -> karras, Euler a -> uniform). A label we do not have is a warning
    naming it, and no schedule is set (the tab keeps its own)."""
    sampler, implied = s.get("sampler"), s.pop("_implied", None)
    label = parsed.get("Schedule type")
    if label is None:
        label = implied or "automatic"
    if sampler is None:
        key = schedule_key(label)
        if key is not None and key != "automatic":
            s["schedule"] = key
        return
    try:
        s["schedule"] = resolve_schedule(label, sampler)
    except ValueError:
        s["warnings"].append(f"schedule type {label!r} is not available here (known: "
                             f"{', '.join(SCHEDULE_DISPLAY_NAMES.values())}); the tab keeps its own schedule")


def to_settings(parsed: dict[str, str]) -> dict:
    """Parsed fields -> typed settings named like GenerateParams (only the fields present; unknown samplers are
    reported in "warnings" instead of raising)."""
    s: dict = {"prompt": parsed.get("Prompt", ""), "negative_prompt": parsed.get("Negative prompt", ""),
               "warnings": []}
    ints = {"Steps": "steps", "Seed": "seed", "Clip skip": "clip_skip", "Batch size": "batch_size",
            "Batch pos": "batch_pos",   # A1111's; not written here (each image carries its own seed)
            "SDXL crop top": "crop_top", "SDXL crop left": "crop_left",
            "Mask blur": "mask_blur", "Masked area padding": "masked_padding", "Noise level": "noise_level"}
    floats = {"CFG scale": "cfg", "Denoising strength": "strength", "Aesthetic score": "aesthetic_score",
              "Negative aesthetic score": "negative_aesthetic_score", "Refiner switch at": "refiner_switch_at"}
    for key, name in ints.items():
        if key in parsed:
            s[name] = int(float(parsed[key]))
    for key, name in floats.items():
        if key in parsed:
            s[name] = float(parsed[key])
    if "Size-1" in parsed:
        s["width"], s["height"] = int(parsed["Size-1"]), int(parsed["Size-2"])
    for key, name in (("SDXL original size", "sdxl_original_size"), ("SDXL target size", "sdxl_target_size")):
        if f"{key}-1" in parsed:
            s[name] = (int(parsed[f"{key}-2"]), int(parsed[f"{key}-1"]))  # (height, width)
    if "crop_top" in s or "crop_left" in s:
        s["sdxl_crop"] = (s.pop("crop_top", 0), s.pop("crop_left", 0))
    if "Sampler" in parsed:
        try:
            s["sampler"], sched = sampler_from_display(parsed["Sampler"])
            if sched:
                s["_implied"] = sched
        except ValueError:
            s["warnings"].append(f"unknown sampler {parsed['Sampler']!r}")
    if "Sampler" in parsed or "Schedule type" in parsed:
        _schedule_of(parsed, s)
    for key, name in (("Model", "model"), ("Model hash", "model_hash")):
        if key in parsed:
            s[name] = parsed[key]
    for key, name in (("Masked content", "masked_content"), ("Inpaint area", "inpaint_area")):
        if key in parsed:
            s[name] = parsed[key].strip().lower()
    # SD3 / 3.5 (sd.families.sd3): the flow shift, skip-layer guidance, T5 left out; named like their inputs
    for key, (name, kind) in {"Shift": ("shift", float), "Skip layer guidance layers": ("slg_layers", str),
                              "Skip layer guidance scale": ("slg_scale", float),
                              "Skip layer guidance start": ("slg_start", float),
                              "Skip layer guidance end": ("slg_end", float)}.items():
        if key in parsed:
            s[name] = kind(parsed[key])
    if parsed.get("T5", "").strip().lower() == "off":
        s["use_t5"] = False
    for key, name in (("Lora hashes", "lora_hashes"), ("TI hashes", "ti_hashes")):   # A1111: "name: hash, ..."
        if key in parsed:
            s[name] = {n.strip(): h.strip() for n, _, h in (x.rpartition(":") for x in parsed[key].split(","))
                       if n.strip()}
    for key, name in (("VAE", "vae"), ("VAE hash", "vae_hash")):
        if key in parsed:
            s[name] = parsed[key]
    if "Refiner" in parsed:
        m = re.match(r"^(.*?)(?:\s*\[([0-9a-fA-F]+)\])?$", parsed["Refiner"])
        s["refiner"], s["refiner_hash"] = m.group(1), m.group(2)
    s.update(_hires_settings(parsed, s))
    return s


def _hires_settings(parsed: dict[str, str], s: dict) -> dict:
    """A1111's hires-fix fields (sd.hires) -> hires, hires_scale, hires_resize_x/_y, hires_steps, hires_upscaler and
    hires_denoise (its `Denoising strength` is the second pass's); {} when the image was not made with hires fix."""
    if not any(k in parsed for k in ("Hires upscale", "Hires upscaler", "Hires resize-1")):
        return {}
    out: dict = {"hires": True}
    if "Hires upscale" in parsed:
        out["hires_scale"] = float(parsed["Hires upscale"])
    if "Hires resize-1" in parsed:
        out["hires_resize_x"], out["hires_resize_y"] = int(parsed["Hires resize-1"]), int(parsed["Hires resize-2"])
    if "Hires steps" in parsed:
        out["hires_steps"] = int(float(parsed["Hires steps"]))
    if "Hires upscaler" in parsed:
        out["hires_upscaler"] = parsed["Hires upscaler"]
    if "strength" in s:
        out["hires_denoise"] = s["strength"]
    return out


def guess_tab(settings: dict, models: dict[str, str] | None = None) -> str:
    """Which app tab the settings belong to. First the checkpoint (A1111's own order: `Model hash`, then `Model`):
    `models` maps the models folder's files to their tab by short hash (10 hex, where known) and by file stem. Then
    the fields: inpainting fields mean the inpaint tab; SD3 fields (Shift, skip-layer guidance) mean SD3; SDXL fields
    mean SDXL. Size last: at least 1024 x 768 pixels means SDXL, both sides >= 768 SD 2 (768-v); otherwise SD 1.x
    (so a 512x768 SD 1.x portrait stays on the SD 1.x tab)."""
    models = models or {}
    for key in (settings.get("model_hash"), settings.get("model")):
        if key and key in models:
            return models[key]
    if any(k in settings for k in ("mask_blur", "masked_content", "inpaint_area", "masked_padding")):
        return "inpaint"
    if any(k in settings for k in ("shift", "slg_layers", "use_t5")):   # SD3 / 3.5 fields
        return "sd3"
    if any(k in settings for k in ("sdxl_original_size", "sdxl_target_size", "sdxl_crop", "refiner",
                                   "aesthetic_score")):
        return "sdxl"
    w, h = settings.get("width", 512), settings.get("height", 512)
    if w * h >= 1024 * 768:
        return "sdxl"
    if min(w, h) >= 768:
        return "sd2"
    return "sd1"


def _exif_user_comment(img: Image.Image) -> str | None:
    """A1111 stores the text of JPEG/WebP images in EXIF UserComment (piexif 'UNICODE' = UTF-16)."""
    try:
        raw = img.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:
        return None
    if not raw:
        return None
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head.startswith(b"UNICODE"):
        for enc in ("utf-16-be", "utf-16-le"):
            try:
                text = body.decode(enc)
                if text.isprintable() or "\n" in text:
                    return text
            except UnicodeDecodeError:
                continue
    return body.decode("utf-8", errors="replace") if head.startswith(b"ASCII") else None


def read_parameters(image: str | os.PathLike | Image.Image) -> str | None:
    """The `parameters` text of an image file or PIL image (PNG chunk, or EXIF UserComment), or None."""
    img = image if isinstance(image, Image.Image) else Image.open(image)
    text = img.info.get("parameters")
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return text or _exif_user_comment(img)


def save_png(image: Image.Image, parameters: str, folder: str | os.PathLike, seed: int) -> Path:
    """Save to folder/YYYY-MM-DD/NNNNN-SEED.png with the `parameters` chunk. Never overwrites: the name is
    reserved by an exclusive create, the PNG written to a temporary file beside it and renamed over the
    reservation, so the final name never holds a partial PNG. On a write error (read-only folder, disk full)
    nothing is left behind and an OSError says, on one line, what to do."""
    import errno
    import tempfile

    day = Path(folder) / time.strftime("%Y-%m-%d")
    path, tmp = day, None
    try:
        day.mkdir(parents=True, exist_ok=True)
        numbers = [int(p.name[:5]) for p in day.glob("*.png") if p.name[:5].isdigit()]
        n = max(numbers, default=-1) + 1
        while True:
            path = day / f"{n:05d}-{seed}.png"
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
                break
            except FileExistsError:
                n += 1
        reserved = path
        try:
            info = PngInfo()
            info.add_text("parameters", parameters)
            fd, tmp = tempfile.mkstemp(dir=day, prefix=f".{path.stem}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                image.save(f, format="PNG", pnginfo=info)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, os.stat(path).st_mode & 0o777)  # mkstemp's is owner-only; the reservation has the umask's
            os.replace(tmp, path)
            tmp = None
        except BaseException:
            for leftover in (tmp, reserved):
                if leftover is not None:
                    try:
                        os.unlink(leftover)
                    except OSError:
                        pass
            raise
        return path
    except OSError as e:
        hint = {errno.ENOSPC: "free space", errno.EDQUOT: "free space"}.get(e.errno, "make the folder writable")
        err = OSError(f"cannot write {path}: {e.strerror or e}; {hint} or start with --outputs-dir pointing at "
                      "another folder")
        err.errno = e.errno
        raise err from None
