import pytest
import torch

from kappatune.devices import resolve_device
from kappatune.errors import KappaTuneError


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(KappaTuneError, match="no CUDA device is available"):
        resolve_device("cuda")
    with pytest.raises(KappaTuneError, match="--device must be auto, cpu or cuda, got 'tpu'"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda") == torch.device("cuda")
