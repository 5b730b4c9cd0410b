from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from kappatune.analysis.spectra import analyze
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, SelectionEntry, select
from kappatune.training import accelerate_engine as dt
from kappatune.training.freezing import (
    apply_selection,
    param_numel,
    param_shape,
    resolve_names,
    trainable_names,
    trainable_parameters,
)
from kappatune.training.methods import decay_groups
from tests.unit._tiny_models import save_tiny_model, tiny_llama

FSDP_LINE = (
    "FSDP without use_orig_params cannot train some tensors of a flat parameter and freeze the"
    " others; set fsdp_use_orig_params: true in the accelerate config (or --fsdp_use_orig_params"
    " true), or use FSDP2 (fsdp_version: 2)"
)


# --------------------------------------------------------------------------- ZeRO-3 shapes


def partition_like_zero3(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Replace every parameter by a shape-[0] tensor carrying ds_shape/ds_numel, as ZeRO-3 does."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in list(model.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        stub = nn.Parameter(torch.empty(0, dtype=p.dtype), requires_grad=p.requires_grad)
        stub.ds_shape = p.shape  # type: ignore[attr-defined]
        stub.ds_numel = p.numel()  # type: ignore[attr-defined]
        setattr(owner, leaf, stub)
        shapes[name] = tuple(p.shape)
    return shapes


def test_zero3_partitioned_parameters_freeze_by_name_with_real_shapes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path / "cache"))
    path = save_tiny_model(tmp_path / "tiny")
    selection = select(analyze(str(path)), "lowest-kappa", Budget(tensors=4))
    model = tiny_llama(0)
    shapes = partition_like_zero3(model)
    assert all(p.shape == (0,) for p in model.parameters())

    def no_spectra(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("kappa must come from the checkpoint files, not the model")

    monkeypatch.setattr("kappatune.analysis.spectra.compute", no_spectra)
    monkeypatch.setattr("kappatune.analysis.spectra.analyze", no_spectra)
    assert resolve_names(model, selection.names) == {n: n for n in selection.names}
    groups = apply_selection(model, selection, weight_decay=0.1)
    assert [(g["group"], g["names"]) for g in groups] == [("decay", list(selection.names))]
    assert trainable_names(model) == [n for n in shapes if n in set(selection.names)]
    assert trainable_parameters(model) == selection.param_count
    assert selection.param_count == sum(
        shapes[n][0] * shapes[n][1] for n in selection.names
    )  # every selected tensor is a matrix
    assert [g["names"] for g in decay_groups(model, 0.1)] == [
        [n for n in shapes if n in set(selection.names)]
    ]
    norm = "model.layers.0.input_layernorm.weight"
    p = dict(model.named_parameters())[norm]
    assert (param_shape(p), param_numel(p), tuple(p.shape)) == ((32,), 32, (0,))


def test_zero3_refuses_masking_some_experts() -> None:
    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.empty(0))
            self.gate_up_proj.ds_shape = torch.Size((4, 6, 5))  # type: ignore[attr-defined]

    model = nn.Module()
    model.experts = Experts()
    entries = tuple(SelectionEntry("experts.gate_up_proj", e, 1.0, 30) for e in (0, 2))
    sel = Selection(entries, "manual", None, "test", "", 2, 60, 120)
    with pytest.raises(KappaTuneError, match=r"trains 2 of 4 experts of 'experts.gate_up_proj'"):
        apply_selection(model, sel)
    whole = tuple(SelectionEntry("experts.gate_up_proj", e, 1.0, 30) for e in range(4))
    groups = apply_selection(model, Selection(whole, "manual", None, "test", "", 4, 120, 120))
    assert [(g["group"], g["names"]) for g in groups] == [("decay", ["experts.gate_up_proj"])]


# --------------------------------------------------------------------------- FSDP


@pytest.mark.parametrize(
    ("version", "orig", "raises"),
    [(1, False, True), (1, None, True), (1, True, False), (2, None, False)],
)
def test_check_fsdp_plugin(version: int, orig: bool | None, raises: bool) -> None:
    plugin = SimpleNamespace(fsdp_version=version, use_orig_params=orig)
    model = nn.Linear(2, 2)
    if raises:
        with pytest.raises(KappaTuneError) as err:
            dt.check_fsdp(plugin, model)
        assert str(err.value) == FSDP_LINE
    else:
        dt.check_fsdp(plugin, model)
    dt.check_fsdp(None, model)


def test_check_fsdp_plugin_from_accelerate() -> None:
    from accelerate.utils import FullyShardedDataParallelPlugin

    with pytest.raises(KappaTuneError, match="fsdp_use_orig_params: true"):
        dt.check_fsdp(
            FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=False), nn.Linear(2, 2)
        )
    dt.check_fsdp(
        FullyShardedDataParallelPlugin(fsdp_version=1, use_orig_params=True), nn.Linear(2, 2)
    )


def test_check_fsdp_wrapped_model(tmp_path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        cpu = torch.device("cpu")
        flat = FSDP(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), device_id=cpu)
        with pytest.raises(KappaTuneError) as err:
            dt.check_fsdp(None, flat)
        assert str(err.value) == FSDP_LINE
        dt.check_fsdp(None, FSDP(nn.Linear(4, 2), device_id=cpu, use_orig_params=True))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- helpers


def test_broadcast_from_main_without_a_world_runs_locally() -> None:
    assert dt.broadcast_from_main(lambda: 7, str, int) == 7

    def fail() -> int:
        raise KappaTuneError("boom")

    with pytest.raises(KappaTuneError, match=r"^boom$"):
        dt.broadcast_from_main(fail, str, int)


def test_launched(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(var, raising=False)
    assert not dt.launched()
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert dt.launched()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert dt.launched()


def fake_engine(grad_accum: int, world: int) -> dt.AccelerateEngine:
    acc = SimpleNamespace(
        gradient_accumulation_steps=grad_accum, num_processes=world, process_index=0
    )
    return dt.AccelerateEngine(acc, batch_size=3, max_grad_norm=0.5)


def test_resume_that_changes_a_frozen_tensor_is_refused(tmp_path: Path) -> None:
    """accelerate's load_state restores the whole model: a checkpoint whose copy of a frozen
    tensor differs is refused before training."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)

    def load_state(_: str) -> None:
        with torch.no_grad():
            model[1].weight.add_(1.0)  # trainable: may change
            if "evil" in _:
                model[0].weight.add_(1.0)  # frozen: must not

    acc = SimpleNamespace(
        gradient_accumulation_steps=1, num_processes=1, process_index=0, state=SimpleNamespace(),
        prepare=lambda *a: a, load_state=load_state,
    )  # fmt: skip
    engine = dt.AccelerateEngine(acc, resume_from=tmp_path / "checkpoint" / "accelerate")
    engine.prepare(model, None, None)
    engine.resume_from = tmp_path / "evil" / "accelerate"
    with pytest.raises(KappaTuneError) as err:
        engine.prepare(model, None, None)
    assert str(err.value) == (
        f"checkpoint {tmp_path / 'evil'} changes 1 frozen tensor(s) (e.g. 0.weight); remove it to restart"
    )


def test_deepspeed_config_auto_entries_come_from_the_flags() -> None:
    config: dict[str, Any] = {"train_batch_size": "auto", "gradient_clipping": "auto"}
    fake_engine(2, 4)._fill_deepspeed(config)
    assert config == {
        "train_batch_size": 24,
        "gradient_clipping": 0.5,
        "train_micro_batch_size_per_gpu": 3,
        "gradient_accumulation_steps": 2,
    }
    with pytest.raises(KappaTuneError) as err:
        fake_engine(2, 4)._fill_deepspeed({"gradient_accumulation_steps": 8})
    assert str(err.value) == (
        "the DeepSpeed config sets gradient_accumulation_steps 8 but --grad-accum gives 2;"
        ' set it to "auto" in the config'
    )


def test_resume_point(tmp_path: Path) -> None:
    from kappatune.training.checkpoint import write_manifest

    ckpt = tmp_path / "checkpoint"
    assert dt.resume_point(ckpt) is None
    ckpt.mkdir()
    meta = {"step": 1, "losses": [2.5], "step_times": [0.5], "ema": 0.25}
    (ckpt / "loop.json").write_text(json.dumps({"format": 1, "state": meta}))
    with pytest.raises(KappaTuneError, match="written by a single-process run"):
        dt.resume_point(ckpt)
    (ckpt / "accelerate").mkdir()
    torch.save({"w": torch.ones(2)}, ckpt / "accelerate" / "optimizer.bin")
    with pytest.raises(KappaTuneError, match=r"has no manifest.json"):
        dt.resume_point(ckpt)
    write_manifest(ckpt, ("loop.json", "accelerate/optimizer.bin"), {})
    assert dt.resume_point(ckpt) == (ckpt / "accelerate", meta)


class _Marker:
    """Unpickling this calls open(path, "w"): the file appears if the pickle ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize(
    "name",
    [
        "optimizer.bin",
        "pytorch_model/.metadata",
        "random_states_0.pkl",
        "pytorch_model/global_step2/mp_rank_00_model_states.pt",  # protocol 0: no PROTO byte
    ],
)
def test_resume_point_refuses_a_planted_pickle(tmp_path: Path, name: str) -> None:
    """Files that accelerate, DeepSpeed (weights_only=False) or torch.distributed.checkpoint
    (pickle.load) would unpickle are scanned first: a planted one is refused, never run."""
    import pickle

    from kappatune.training.checkpoint import write_manifest

    ckpt = tmp_path / "checkpoint"
    (ckpt / "accelerate" / "pytorch_model").mkdir(parents=True)
    meta = {"step": 0, "losses": [], "step_times": [], "ema": 0.0}
    (ckpt / "loop.json").write_text(json.dumps({"format": 1, "state": meta}))
    marker = tmp_path / "marker"
    path = ckpt / "accelerate" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (ckpt / "accelerate" / "pytorch_model" / "latest").write_text("global_step2")  # not a pickle
    if name.endswith(".metadata"):
        path.write_bytes(pickle.dumps({"plan": _Marker(marker)}, protocol=4))
    elif name.endswith(".pt"):
        path.write_bytes(pickle.dumps({"plan": _Marker(marker)}, protocol=0))
        assert path.read_bytes()[:1] == b"("  # a text pickle, no PROTO byte
    else:
        torch.save({"state": _Marker(marker)}, path)
    write_manifest(ckpt, ("loop.json", f"accelerate/{name}", "accelerate/pytorch_model/latest"), {})
    with pytest.raises(KappaTuneError) as err:
        dt.resume_point(ckpt)
    assert str(err.value).startswith(f"{path}")
    assert "would call io.open when loaded; it is not loaded" in str(err.value)
    assert not marker.exists()
