"""`python -m sd download t5-tokenizer` (issue 16): T5's spiece.model from google/t5-v1_1-xxl into the models folder's
text_encoders/, where SD3 / 3.5 look for it. No network here: the hub is made unreachable (huggingface_hub offline
mode) and the test pins the one-line error, naming the file and the folder it would go into, and that no file is
written."""
from __future__ import annotations

import pytest


def test_t5_tokenizer_download_unreachable_hub(tmp_path, capsys, monkeypatch) -> None:
    from huggingface_hub import constants

    from sd.download import OFFICIAL, main

    assert OFFICIAL["t5-tokenizer"][:2] == ("google/t5-v1_1-xxl", "spiece.model")
    assert main(["--list"]) == 0
    assert "t5-tokenizer" in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)   # read at call time: no connection is tried
    models = tmp_path / "models"
    assert main(["t5-tokenizer", "--models-dir", str(models)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("error: could not download google/t5-v1_1-xxl/spiece.model (")
    assert err[0].endswith(f"); put the file in {(models / 'text_encoders').resolve()} by hand instead")
    assert not (models / "text_encoders" / "spiece.model").exists()   # (huggingface_hub leaves only its .cache/)
    assert [p.name for p in models.rglob("*") if p.is_file() and ".cache" not in p.parts] == []


@pytest.mark.parametrize("name", ["sd15"])
def test_checkpoints_still_go_to_the_models_folder_itself(tmp_path, capsys, monkeypatch, name) -> None:
    from huggingface_hub import constants

    from sd.download import main

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert main([name, "--models-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"put the file in {tmp_path.resolve()} by hand instead")
