"""A float16 file loaded into float16 / bfloat16 models without a float32 copy (issue 14, memory).

float16 -> float16: every weight of the UNet, the VAE and the text tower is a view of the file's mmap (its data
lies inside the file's mapped range; nothing copied). float16 -> bfloat16: no tensor is ever cast to float32 during
the load (every aten._to_copy watched by a dispatch mode), and the weights equal the file's tensors cast once.
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode

from sd.checkpoint import open_checkpoint
from sd.pipeline import load_model

from .tiny import tiny_state_dict

PARTS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")


@pytest.fixture(scope="module")
def fp16_file(tmp_path_factory):
    """The tiny SD 1.5 file with every network weight stored in float16 (as the released fp16 files)."""
    sd = {k: (v.half() if k.startswith(PARTS) and v.is_floating_point() else v).contiguous()
          for k, v in tiny_state_dict("sd1").items()}
    path = tmp_path_factory.mktemp("fp16") / "sd1_fp16.safetensors"
    save_file(sd, str(path))
    return path


def _mapped_ranges(path) -> list[tuple[int, int]]:
    name = str(path.resolve())
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith(name):
                lo, hi = line.split()[0].split("-")
                out.append((int(lo, 16), int(hi, 16)))
    return out


def _weights(model):
    return {f"{i}.{n}": p for i, m in enumerate([model.parts.unet, model.parts.vae, *model.parts.text_encoders])
            for n, p in m.named_parameters()}


def test_float16_file_into_float16_models_is_the_mmap_itself(fp16_file) -> None:
    model = load_model(fp16_file, dtype="float16")
    ranges = _mapped_ranges(fp16_file)
    assert ranges
    weights = _weights(model)
    outside = [n for n, p in weights.items()
               if p.dtype != torch.float16 or not any(lo <= p.data_ptr() < hi for lo, hi in ranges)]
    assert outside == []
    assert len(weights) > 100


class _Casts(TorchDispatchMode):
    """Records the dtype pair of every real (non-meta) aten._to_copy."""

    def __init__(self):
        super().__init__()
        self.casts: list[tuple[torch.dtype, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default and not args[0].is_meta:
            self.casts.append((args[0].dtype, out.dtype))
        return out


def test_float16_file_into_bfloat16_models_casts_once_without_float32(fp16_file) -> None:
    with _Casts() as mode:
        model = load_model(fp16_file, dtype="bfloat16")
    assert (torch.float16, torch.float32) not in mode.casts
    assert mode.casts.count((torch.float16, torch.bfloat16)) == len(_weights(model))   # one cast per weight
    ckpt = open_checkpoint(fp16_file)
    unet = model.parts.unet
    for name in ("input_blocks.0.0.weight", "out.2.weight"):
        assert torch.equal(unet.get_parameter(name), ckpt.get("model.diffusion_model." + name).to(torch.bfloat16))
    tower = model.parts.text_encoders[0]
    emb = tower.text_model.embeddings.token_embedding.weight
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, ckpt.get(key).to(torch.bfloat16))


class _CastSources(TorchDispatchMode):
    """For every real float16 -> float32 aten._to_copy: whether its input lies in a mapping of `path` right then."""

    def __init__(self, path):
        super().__init__()
        self.path, self.from_map = path, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (func is torch.ops.aten._to_copy.default and not args[0].is_meta
                and (args[0].dtype, out.dtype) == (torch.float16, torch.float32)):
            ptr = args[0].data_ptr()
            self.from_map.append(any(lo <= ptr < hi for lo, hi in _mapped_ranges(self.path)))
        return out


def test_float16_file_into_float32_models_casts_from_its_own_reads(fp16_file) -> None:
    """float16 -> float32 (SDXL's files on a CPU): each tensor is read into a buffer of its own and cast from there,
    never from the file's mmap, so the mapped float16 pages do not sit beside the float32 copy; values exact."""
    with _CastSources(fp16_file) as mode:
        model = load_model(fp16_file, dtype="float32")
    weights = _weights(model)
    assert len(mode.from_map) >= len(weights) > 100 and not any(mode.from_map)
    ckpt = open_checkpoint(fp16_file)
    for name in ("input_blocks.0.0.weight", "out.2.weight"):
        want = ckpt.get("model.diffusion_model." + name).float()
        assert torch.equal(model.parts.unet.get_parameter(name), want)
    vae = model.parts.vae.get_parameter("decoder.conv_out.weight")
    assert vae.dtype == torch.float32 and torch.equal(vae, ckpt.get("first_stage_model.decoder.conv_out.weight").float())


def test_a_file_cut_short_after_opening_is_one_line(fp16_file, tmp_path) -> None:
    import shutil

    from sd.checkpoint import CheckpointError

    path = shutil.copy(fp16_file, tmp_path / "cut.safetensors")
    ckpt = open_checkpoint(path)
    key = max(ckpt.infos, key=lambda k: ckpt.infos[k].offset)   # the last tensor in the file
    with open(path, "r+b") as f:
        f.truncate(ckpt.infos[key].offset + 2)
    with pytest.raises(CheckpointError) as e:
        ckpt.get_as(key, torch.float32)
    msg = str(e.value)
    assert msg.startswith("cut.safetensors: tensor ") and "is cut short (2 of " in msg and len(msg.splitlines()) == 1
