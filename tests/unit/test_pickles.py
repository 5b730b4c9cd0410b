from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kappatune.errors import KappaTuneError
from kappatune.training.pickles import check_folder, pickle_globals


def test_tensors_optimizer_and_rng_states_pass(tmp_path: Path) -> None:
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.ones(1, 3)).sum().backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.bin")
    rng = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state()}
    torch.save(rng | {"torch_manual_seed": torch.get_rng_state()}, tmp_path / "random_states_0.pkl")
    (tmp_path / "latest").write_text("global_step2")
    (tmp_path / "zero_to_fp32.py").write_text("import os\n")
    assert check_folder(tmp_path) == 3  # two zip pickles and "latest", which is no pickle


def test_globals_of_protocol_0_and_5() -> None:
    data = pickle.dumps({"a": (1, "x"), "b": [1.5]}, protocol=0)
    assert list(pickle_globals(data)) == []
    assert list(pickle_globals(b"cos\nsystem\n(S'true'\ntR.")) == ["os.system"]
    two = pickle.dumps(slice(1, 2), protocol=5) + pickle.dumps(set(), protocol=2)
    assert list(pickle_globals(two)) == ["builtins.slice", "builtins.set"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x80\x02\x82\x01R.", r"an extension-registry global"),  # EXT1 code 1
        (b"\x80\x04K\x01\xff", r"malformed pickle"),
        (b"cposix\nsystem\n(S'x'\ntR.", r"would call posix.system when loaded"),
    ],
)
def test_unfollowable_or_unsafe_pickles_are_refused(
    tmp_path: Path, data: bytes, message: str
) -> None:
    (tmp_path / "scheduler.bin").write_bytes(data)
    with pytest.raises(KappaTuneError, match=message):
        check_folder(tmp_path)


def test_distributed_checkpoint_metadata_passes(tmp_path: Path) -> None:
    """The .metadata file FSDP's sharded state is saved with (torch.distributed.checkpoint)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    chunk = ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 2]))
    tensor = TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), torch.Size([2, 2]), [chunk]
    )
    md = Metadata({"w": tensor}, storage_data={MetadataIndex("w"): _StorageInfo("a.distcp", 0, 16)})
    (tmp_path / "pytorch_model_fsdp_0").mkdir()
    (tmp_path / "pytorch_model_fsdp_0" / ".metadata").write_bytes(pickle.dumps(md))
    assert check_folder(tmp_path) == 1
