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

from .embeddings import candidates, use_embeddings
from .lora import apply_loras, format_hashes, load_lora, parse_prompt
from .models_dir import extra_files, resolve_extra
from .vae_choice import infotext_fields


def needs_networks(p, model=None) -> bool:
    """True when the request has LoRA tags or files, or folders where its prompt's embeddings may be, or the model
    decodes with an external VAE (its infotext fields)."""
    return ("<lora:" in (p.prompt or "") or bool(getattr(p, "loras", ())) or bool(getattr(p, "models_dir", None))
            or bool(getattr(p, "embeddings_dir", None)) or getattr(model, "vae_file", None) is not None)


def embedding_paths(p) -> list[Path]:
    """The listed embedding files the request's prompt or negative prompt may name."""
    files = extra_files("embedding", getattr(p, "models_dir", None), getattr(p, "embeddings_dir", None))
    return candidates(f"{p.prompt or ''}\n{p.negative_prompt or ''}", files) if files else []


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
    """`run(model, p, callback, stop)` (the plain generate) with the request's LoRAs and embeddings applied; the
    result's info gets `infotext` fields (`Lora hashes`, `TI hashes`, an external VAE's `VAE hash` and `VAE`) and
    notes (modules that matched nothing)."""
    prompt, files = request_loras(p)
    paths = embedding_paths(p)
    q = replace(p, prompt=prompt, loras=(), models_dir=None, loras_dir=None, embeddings_dir=None)
    label = model.family.label
    plain = replace(model, vae_file=None)   # the same parts: the run below does not come back here
    with apply_loras(model.parts, files, label=label) as applied, \
            use_embeddings(model.parts.text_encoders, paths, label=label) as used:
        result = run(plain, q, callback=callback, stop=stop)
    info = dict(result.info)
    fields = {**info.get("infotext", {}), **infotext_fields(getattr(model, "vae_file", None))}
    if applied.files:
        fields["Lora hashes"] = format_hashes(applied.files)
    if used:
        fields["TI hashes"] = format_hashes(list(used.items()))
    if fields:
        info["infotext"] = fields
    notes = [*info.get("notes", []), *applied.notes()]
    if notes:
        info["notes"] = notes
    result.info = info
    return result
