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


def test_a_device_without_float64_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from kappatune import devices
    from kappatune.analysis.spectra import AnalyzeOptions
    from kappatune.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(devices, "_has_float64", lambda device: False)
    msg = "the cuda device does not support float64, which exact spectra need; use --device cpu"
    with pytest.raises(KappaTuneError) as err:
        AnalyzeOptions(device="cuda").torch_device()
    assert str(err.value) == msg
    assert main(["analyze", "all-minilm-l6-v2", "--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"kappatune: error: {msg}"]
    devices.require_float64(torch.device("cpu"))  # the CPU is never probed


def test_float64_probe_on_the_cpu() -> None:
    from kappatune import devices

    assert devices._has_float64("cpu") is True
