"""sd.file_cache.FileCache (the LoRA and embedding loaders' cache): a hit reads nothing, an edited or replaced file is
read again, the oldest entry goes past the size, and the loaders return the cached object itself."""
from __future__ import annotations

import os

import torch

from sd.file_cache import FileCache


def test_hits_changes_and_eviction(tmp_path):
    reads = []

    def read(path):
        reads.append(path.name)
        return path.read_text()

    cache = FileCache(read, size=2)
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for p in (a, b, c):
        p.write_text(p.name)
    assert cache.get(a) == "a" and cache.get(str(a)) == "a" and reads == ["a"]     # a str path is the same key
    st = a.stat()
    a.write_text("A")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cache.get(a) == "A" and reads == ["a", "a"]                             # edited: read again
    cache.get(b), cache.get(c)                                                     # 3 keys seen, 2 kept
    assert reads == ["a", "a", "b", "c"]
    cache.get(c), cache.get(b)
    assert reads == ["a", "a", "b", "c"]
    cache.get(a)                                                                   # the oldest went: read again
    assert reads == ["a", "a", "b", "c", "a"]


def test_loaders_return_the_cached_object(tmp_path):
    from safetensors.torch import save_file

    from sd.embeddings import load_embedding
    from sd.lora import load_lora

    emb = tmp_path / "tok.safetensors"
    save_file({"emb_params": torch.randn(2, 8)}, str(emb))
    assert load_embedding(emb) is load_embedding(emb)
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(4, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 4)}, str(lora))
    assert load_lora(lora) is load_lora(lora)
