"""accelerate's process index is corrected to the process group's rank around save/load_state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kappatune.training.accelerate_engine import process_index_of


@pytest.fixture
def shared_states() -> Iterator[tuple[dict, dict]]:
    from accelerate.state import AcceleratorState, PartialState

    saved = [dict(PartialState._shared_state), dict(AcceleratorState._shared_state)]
    # what DeepSpeed on CPU leaves every rank with: index 0 of 1
    PartialState._shared_state.update(process_index=0, local_process_index=0, num_processes=1)
    AcceleratorState._shared_state.update(process_index=0, local_process_index=0, num_processes=1)
    yield PartialState._shared_state, AcceleratorState._shared_state
    for state, old in zip(
        (PartialState._shared_state, AcceleratorState._shared_state), saved, strict=True
    ):
        state.clear()
        state.update(old)


def test_index_is_the_rank_inside_and_restored_after(
    shared_states: tuple[dict, dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    with process_index_of(1):
        assert [(s["process_index"], s["local_process_index"]) for s in shared_states] == [
            (1, 1),
            (1, 1),
        ]
        assert [s["num_processes"] for s in shared_states] == [1, 1]  # counts untouched
    assert [(s["process_index"], s["local_process_index"]) for s in shared_states] == [
        (0, 0),
        (0, 0),
    ]


def test_index_is_restored_when_the_block_raises(shared_states: tuple[dict, dict]) -> None:
    with pytest.raises(RuntimeError, match="boom"), process_index_of(1):
        raise RuntimeError("boom")
    assert [s["process_index"] for s in shared_states] == [0, 0]


def test_a_right_index_is_left_alone(shared_states: tuple[dict, dict]) -> None:
    with process_index_of(0):
        assert [s["process_index"] for s in shared_states] == [0, 0]
