from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kappatune.errors import KappaTuneError
from kappatune.training import checkpoint as ck


def test_state_codec_round_trip_keeps_types() -> None:
    state = {
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6.0).reshape(2, 3)}},
            "param_groups": [{"betas": (0.9, 0.999), "params": [0], "foreach": None, "x": True}],
        },
        "ema": math.inf,
        "losses": [1.5, -math.inf],
        "name": "decay",
    }
    tensors: dict[str, torch.Tensor] = {}
    encoded = ck.encode_state(state, tensors)
    json.dumps(encoded, allow_nan=False)  # strict JSON
    assert sorted(tensors) == ["t0", "t1"]
    back = ck.decode_state(json.loads(json.dumps(encoded)), tensors)
    assert list(back["optimizer"]["state"]) == [0]  # integer keys stay integers
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["ema"] == math.inf and back["losses"] == [1.5, -math.inf]
    assert torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize(
    "bad",
    [
        {"tensor": "t9"},
        {"float": "1e3"},
        {"pickle": "x"},
        {"dict": [[{"tuple": []}, 1]]},
        {"a": 1, "b": 2},
    ],
)
def test_state_codec_rejects_what_it_did_not_write(bad: object) -> None:
    with pytest.raises(ValueError):
        ck.decode_state(bad, {"t0": torch.zeros(1)})


def _write(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    state = {"step": 1, "losses": [2.0], "step_times": [0.1], "ema": 0.2, "optimizer": {}}
    ck.write_checkpoint(folder, {"w": torch.ones(2, 2)}, state)
    return folder


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    folder = _write(tmp_path)
    manifest = json.loads((folder / ck.MANIFEST).read_text())
    assert sorted(manifest["files"]) == ["loop.json", "loop.safetensors", "trainable.safetensors"]
    assert manifest["tensors"] == {"w": {"shape": [2, 2], "dtype": "float32"}}
    tensors, state = ck.read_checkpoint(folder, {"w": ck.TensorSpec((2, 2), "float32")})
    assert torch.equal(tensors["w"], torch.ones(2, 2)) and state["losses"] == [2.0]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_manifest", r"has no manifest.json"),
        ("flipped", r"has a damaged trainable.safetensors: its digest differs from the manifest"),
        ("truncated", r"has a damaged trainable.safetensors: \d+ bytes, the manifest says \d+"),
        ("history", r"has an unreadable loop.json \(losses does not hold 1 values\)"),
        ("escape", r"lists an invalid file '../x' in manifest.json"),
    ],
)
def test_damaged_checkpoint_is_one_line(tmp_path: Path, case: str, message: str) -> None:
    folder = _write(tmp_path)
    path = folder / ck.TRAINABLE
    if case == "no_manifest":
        (folder / ck.MANIFEST).unlink()
    elif case == "flipped":
        data = bytearray(path.read_bytes())
        data[-1] ^= 1
        path.write_bytes(bytes(data))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:-5])
    elif case == "history":
        doc = json.loads((folder / ck.LOOP_JSON).read_text())
        doc["state"]["dict"] = [p for p in doc["state"]["dict"] if p[0] != "losses"]
        doc["state"]["dict"].append(["losses", []])
        (folder / ck.LOOP_JSON).write_text(json.dumps(doc))
        ck.write_manifest(folder, ("trainable.safetensors", "loop.safetensors", "loop.json"), {})
    elif case == "escape":
        (tmp_path / "x").write_text("x")
        ck.write_manifest(folder, ("trainable.safetensors", "../x"), {})
    with pytest.raises(KappaTuneError, match=message):
        ck.read_checkpoint(folder, {"w": ck.TensorSpec((2, 2), "float32")})


def test_truncated_file_with_a_matching_manifest_is_unreadable(tmp_path: Path) -> None:
    folder = _write(tmp_path)
    path = folder / ck.TRAINABLE
    path.write_bytes(path.read_bytes()[:-5])
    ck.write_manifest(folder, ("trainable.safetensors", "loop.safetensors", "loop.json"), {})
    with pytest.raises(KappaTuneError, match=r"has an unreadable trainable.safetensors"):
        ck.read_checkpoint(folder, {"w": ck.TensorSpec((2, 2), "float32")})


@pytest.mark.parametrize(
    ("expected", "message"),
    [
        ({}, r"holds 1 tensor\(s\) this run does not train \(e.g. w\)"),
        ({"w": ck.TensorSpec((2, 2), "float32"), "v": ck.TensorSpec((1,), "float32")}, r"lacks 1"),
        (
            {"w": ck.TensorSpec((4,), "float32")},
            r"holds w as float32 \[2, 2\], the run trains float32 \[4\]",
        ),
        ({"w": ck.TensorSpec((2, 2), "bfloat16")}, r"the run trains bfloat16 \[2, 2\]"),
    ],
)
def test_checkpoint_tensors_must_be_the_runs_own(
    tmp_path: Path, expected: dict[str, ck.TensorSpec], message: str
) -> None:
    with pytest.raises(KappaTuneError, match=message):
        ck.read_checkpoint(_write(tmp_path), expected)


def test_optimizer_state_shapes_are_checked(tmp_path: Path) -> None:
    opt = {
        "param_groups": [{"params": [0]}],
        "state": {0: {"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)}},
    }
    ck.check_optimizer_state(tmp_path, opt, [[(3,)]])
    with pytest.raises(
        KappaTuneError, match=r"exp_avg of shape \[3\] for a parameter of shape \[2\]"
    ):
        ck.check_optimizer_state(tmp_path, opt, [[(2,)]])
    with pytest.raises(KappaTuneError, match=r"parameter groups of sizes \[1\], the run has \[2\]"):
        ck.check_optimizer_state(tmp_path, opt, [[(3,), (3,)]])
