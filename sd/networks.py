"""Extra networks around one request: the prompt's `<lora:NAME:w>` tags (sd.lora), textual-inversion embeddings
(sd.embeddings) and what they add to the result (infotext fields, notes).

`sd.pipeline.generate` hands a request here when it names any (`needs_networks`); `run_with_networks` resolves the
names only through the listings of `sd.models_dir.extra_files` (a name outside them gets the one refusal of
`resolve_extra`), removes the tags from the prompt, applies the LoRAs to this thread's forwards for the duration of
the call (the cached model is never written), and calls the plain generate again with the cleaned request.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .lora import apply_loras, format_hashes, load_lora, parse_prompt
from .models_dir import extra_files, resolve_extra


def needs_networks(p) -> bool:
    """True when the request has LoRA tags or files (a GenerateParams)."""
    return "<lora:" in (p.prompt or "") or bool(getattr(p, "loras", ()))


def lora_listing(p) -> dict[str, Path]:
    """The LoRA files a request may name: its `loras_dir` and the models folder's LoRA sub-folders."""
    return extra_files("LoRA", getattr(p, "models_dir", None), getattr(p, "loras_dir", None))


def request_loras(p) -> tuple[str, list]:
    """(prompt without the tags, [(LoraFile, te multiplier, unet multiplier)]): the tags resolved in the listing,
    then the request's explicit `loras` ((path, te, unet) or a path: weight 1)."""
    prompt, refs = parse_prompt(p.prompt or "")
    files = []
    if refs:
        listing = lora_listing(p)
        for ref in refs:
            files.append((load_lora(resolve_extra(ref.name, listing, "LoRA")), ref.te, ref.unet))
    for item in getattr(p, "loras", ()) or ():
        path, te, unet = (item, 1.0, 1.0) if isinstance(item, (str, Path)) else (item[0], *item[1:3])
        files.append((load_lora(path), float(te), float(unet)))
    return prompt, files


def run_with_networks(run, model, p, callback=None, stop=None):
    """`run(model, p, callback, stop)` (the plain generate) with the request's LoRAs applied; the result's
    info gets `infotext` fields (`Lora hashes`) and notes (modules that matched nothing)."""
    prompt, files = request_loras(p)
    q = replace(p, prompt=prompt, loras=())
    with apply_loras(model.parts, files, label=model.family.label) as applied:
        result = run(model, q, callback=callback, stop=stop)
    info = dict(result.info)
    fields = dict(info.get("infotext", {}))
    if applied.files:
        fields["Lora hashes"] = format_hashes(applied.files)
    if fields:
        info["infotext"] = fields
    notes = [*info.get("notes", []), *applied.notes()]
    if notes:
        info["notes"] = notes
    result.info = info
    return result
