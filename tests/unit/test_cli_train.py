from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kappatune.cli.main import main
from kappatune.selection.core import Selection
from kappatune.training.loop import LocalEngine
from tests.unit._tiny_models import save_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    model = save_tiny_model(tmp_path / "tiny", seed=0)
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    return model, data


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def base(model: Path, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", model, "--data", data, "--output", out, "--steps", 3, "--batch-size", 2,
            "--seq-len", 16, "--lr", 1e-2, *extra]  # fmt: skip


def test_train_selective_saves_model_selection_config(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = setup
    out = tmp_path / "run"
    code, stdout, err = run(
        base(
            model, data, out, "--method", "selective", "--budget-tensors", 2, "--weight-decay", 0.1
        ),
        capsys,
    )
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [
        "log.jsonl",
        "model",
        "result.json",
        "run.json",
        "selection.json",
    ]
    sel = Selection.load(out / "selection.json")
    assert sel.entry_count == 2 and sel.policy == "lowest-kappa"
    run_cfg = json.loads((out / "run.json").read_text())
    assert (
        run_cfg["method"] == "selective"
        and run_cfg["train"]["steps"] == 3
        and run_cfg["train"]["lr"] == 0.01
    )
    assert run_cfg["selection"]["names"] == list(sel.names)
    result = json.loads((out / "result.json").read_text())
    assert (
        result["steps"] == 3
        and len(result["losses"]) == 3
        and result["trainable_params"] == sel.param_count
    )
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    changed = sorted(n for n in before if not torch.equal(before[n], after[n]))
    assert changed == sorted(sel.names)
    assert (out / "model" / "tokenizer.json").is_file()
    assert "trainable parameters" in stdout and "done: 3 steps" in stdout
    # rerun: finished, nothing to do
    code, stdout, _ = run(
        base(
            model, data, out, "--method", "selective", "--budget-tensors", 2, "--weight-decay", 0.1
        ),
        capsys,
    )
    assert code == 0 and "nothing to do" in stdout


def test_train_kappa_lora_adapter_matches_selection(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data = setup
    sel_file = tmp_path / "sel.json"
    assert main(["select", str(model), "--budget-tensors", "3", "-o", str(sel_file)]) == 0
    sel = Selection.load(sel_file)
    out = tmp_path / "kl"
    code, _, err = run(
        base(model, data, out, "--method", "kappa-lora", "--selection", sel_file, "--lora-r", 2),
        capsys,
    )
    assert code == 0, err
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (
        set(cfg["target_modules"]) == {n.removesuffix(".weight") for n in sel.names}
        and cfg["r"] == 2
    )
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    adapted = {
        k.split(".lora_")[0].removeprefix("base_model.model.") for k in weights if ".lora_" in k
    }
    assert adapted == {n.removesuffix(".weight") for n in sel.names}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_train_lora_and_full(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], method: str
) -> None:
    model, data = setup
    out = tmp_path / method
    code, _, err = run(
        base(
            model,
            data,
            out,
            "--method",
            method,
            "--lora-r",
            1,
            "--warmup",
            1,
            "--scheduler",
            "cosine",
        ),
        capsys,
    )
    assert code == 0, err
    assert (out / ("adapter" if method == "lora" else "model")).is_dir()
    assert not (out / "selection.json").exists()
    result = json.loads((out / "result.json").read_text())
    if method == "lora":  # rank 1 on q, o (32+32), k, v (32+16), gate, up, down (32+64) of 2 layers
        assert result["trainable_params"] == 2 * (2 * 64 + 2 * 48 + 3 * 96)
    else:
        weights = load_file(str(model / "model.safetensors"))
        assert result["trainable_params"] == sum(t.numel() for t in weights.values())


def test_train_resumes_from_checkpoint(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = setup
    args = [
        "--method",
        "selective",
        "--budget-tensors",
        3,
        "--checkpoint-every",
        2,
        "--warmup",
        1,
        "--scheduler",
        "linear",
    ]
    ref = tmp_path / "ref"
    assert run(base(model, data, ref, *args), capsys)[0] == 0  # uninterrupted reference
    original = LocalEngine.save_checkpoint

    def interrupted(engine, folder, state):  # type: ignore[no-untyped-def]
        original(engine, folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalEngine, "save_checkpoint", interrupted)
    out = tmp_path / "run"
    code, _, err = run(base(model, data, out, *args), capsys)
    assert code == 130 and "interrupted" in err
    assert (out / "checkpoint" / "manifest.json").is_file() and not (out / "result.json").exists()
    monkeypatch.setattr(LocalEngine, "save_checkpoint", original)
    code, stdout, err = run(base(model, data, out, *args), capsys)
    assert code == 0, err
    assert "resuming from step 2 of 3" in stdout
    got = json.loads((out / "result.json").read_text())
    want = json.loads((ref / "result.json").read_text())
    assert got["steps"] == 3 and got["losses"] == pytest.approx(want["losses"], rel=1e-6)
    assert not (out / "checkpoint").exists()
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(ref / "model" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # a different configuration in the same directory is refused
    code, _, err = run(base(model, data, out, *args[:-2], "--scheduler", "cosine"), capsys)
    assert code == 2 and "different configuration (differs in: train.scheduler)" in err


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_keeps_a_checkpoint_of_the_step_it_arrived_in(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    signum: str,
) -> None:
    """Ctrl-C (or SIGTERM) during step 2 of a run that checkpoints every 10 steps: the step
    finishes, its checkpoint is written, the command ends as interrupted (130); the same
    command goes on from step 2 and ends where an uninterrupted run ends."""
    import os
    import signal

    model, data = setup
    args = ["--method", "selective", "--budget-tensors", 3, "--checkpoint-every", 10,
            "--steps", 4]  # fmt: skip
    ref = tmp_path / "ref"
    assert run(base(model, data, ref, *args), capsys)[0] == 0
    original = LocalEngine.clip
    calls = {"n": 0}

    def signalling(engine, model_, params, max_norm):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # in step 2, before its optimizer step
            os.kill(os.getpid(), getattr(signal, signum))
        return original(engine, model_, params, max_norm)

    monkeypatch.setattr(LocalEngine, "clip", signalling)
    before = signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    code, stdout, err = run(base(model, data, out, *args), capsys)
    assert code == 130 and "interrupted" in err
    assert "stopped after step 2 of 4: its checkpoint is in" in stdout + err
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    from kappatune.training.checkpoint import read_loop_state

    assert read_loop_state(out / "checkpoint")["step"] == 2
    monkeypatch.setattr(LocalEngine, "clip", original)
    code, stdout, err = run(base(model, data, out, *args), capsys)
    assert code == 0, err
    assert "resuming from step 2 of 4" in stdout
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(ref / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished run cannot be made longer: it keeps no optimizer state
    code, _, err = run(base(model, data, out, *args[:-1], 6), capsys)
    assert code == 2 and "holds a finished run of 4 steps" in err


def test_steps_may_grow_while_a_run_has_a_checkpoint(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, data = setup
    args = ["--method", "selective", "--budget-tensors", 3, "--checkpoint-every", 2]
    ref = tmp_path / "ref"
    assert run(base(model, data, ref, *args, "--steps", 6), capsys)[0] == 0
    original = LocalEngine.save_checkpoint

    def interrupted(engine, folder, state):  # type: ignore[no-untyped-def]
        original(engine, folder, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalEngine, "save_checkpoint", interrupted)
    out = tmp_path / "run"
    assert run(base(model, data, out, *args, "--steps", 4), capsys)[0] == 130
    monkeypatch.setattr(LocalEngine, "save_checkpoint", original)
    code, stdout, err = run(base(model, data, out, *args, "--steps", 6), capsys)
    assert code == 0, err
    assert "--steps grows from 4 to 6" in stdout + err and "resuming from step 2 of 6" in stdout
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(ref / "model" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # constant schedule: as if run for 6


def write_foreign_selection(path: Path) -> None:
    """A selection made for another model: GPT-2 names and a layer the tiny model lacks."""
    from kappatune.selection.core import SelectionEntry

    names = ("model.layers.5.self_attn.q_proj.weight", "transformer.h.0.attn.c_attn.weight")
    entries = tuple(SelectionEntry(n, None, 2.0 + i, 100) for i, n in enumerate(names))
    Selection(entries, "lowest-kappa", None, "gpt2", "abc", 2, 200, 1000).save(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("budget", r"budget of 99 tensors exceeds the 16 candidates"),
        (
            "foreign",
            r"2 selected tensor\(s\) are not parameters of the model \(model.layers.5.self_attn.q_proj.weight, transformer.h.0.attn.c_attn.weight\)",
        ),
        ("empty_data", r"empty.txt has no usable text: 3 characters, 0 non-blank"),
        ("missing_data", r"no such data file: .*nope.txt"),
        (
            "selection_lora",
            r"--selection only applies to --method selective or kappa-lora, not lora",
        ),
        ("no_steps", r"give --steps N or --epochs N"),
        ("bad_lr", r"--lr must be a positive number, got -1"),
        ("not_empty", r"is not empty and holds no kappatune run"),
        ("missing_selection", r"no such selection file"),
        ("bad_model", r"unknown model 'nomodel'"),
        ("seq_len", r"sequence length must be at least 2 tokens, got 1"),
        (
            "seq_len_context",
            r"--seq-len 300 exceeds the model's context length of 256 tokens \(config max_position_embeddings\)$",
        ),
        ("budget_percent", r"parameter budget '150%': a percentage must be in \(0, 100\]$"),
        (
            "all_dropped",
            r"no trainable tokens: the completion of every example \(2 of 2\) starts past the 16-token rows of --no-pack",
        ),
    ],
)
def test_train_bad_input(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    model, data = setup
    out = tmp_path / "out"
    argv = base(model, data, out, "--method", "selective")
    if case == "budget":
        argv += ["--budget-tensors", 99]
    elif case == "foreign":
        write_foreign_selection(tmp_path / "foreign.json")
        argv += ["--selection", tmp_path / "foreign.json"]
    elif case == "empty_data":
        (tmp_path / "empty.txt").write_text(" \n\n")
        argv[argv.index(data)] = tmp_path / "empty.txt"
    elif case == "missing_data":
        argv[argv.index(data)] = tmp_path / "nope.txt"
    elif case == "selection_lora":
        write_foreign_selection(tmp_path / "foreign.json")
        argv = base(model, data, out, "--method", "lora", "--selection", tmp_path / "foreign.json")
    elif case == "no_steps":
        i = argv.index("--steps")
        del argv[i : i + 2]
    elif case == "bad_lr":
        argv += ["--lr", -1]
    elif case == "not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "missing_selection":
        argv += ["--selection", tmp_path / "none.json"]
    elif case == "bad_model":
        argv[1] = "nomodel"
    elif case == "seq_len":
        argv += ["--seq-len", 1]
    elif case == "seq_len_context":
        argv += ["--seq-len", 300]
    elif case == "budget_percent":
        argv += ["--budget-params", "150%"]
    elif case == "all_dropped":
        long = tmp_path / "long.jsonl"
        rows = [{"prompt": "p" * n, "completion": "done"} for n in (15, 40)]
        long.write_text("".join(json.dumps(r) + "\n" for r in rows))
        argv[argv.index(data)] = long
        argv += ["--no-pack", "--budget-tensors", 2]
    code, _, err = run(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: "), err
    assert re.search(message, lines[0]), lines[0]
    if case == "not_empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()


ONE_STEP = ("--steps", 1, "--checkpoint-every", 1)


def _adapter(out: Path) -> tuple[dict, int]:
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    return cfg, json.loads((out / "result.json").read_text())["trainable_params"]


def test_kappa_lora_budget_params_is_what_is_trained(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--budget-params sizes the adapter: the rank is fitted, or with --lora-r the module count."""
    model, data = setup
    # lowest kappa first on the tiny model: embed_tokens, lm_head, layers.1.v_proj, 0.k, 1.k, 1.down
    # rank fitted on the first 20% (3 of 16): per rank 160 + 160 + 48 = 368; 3000 // 368 = 8
    out = tmp_path / "rank"
    code, stdout, err = run(
        base(model, data, out, "--method", "kappa-lora", "--budget-params", 3000, *ONE_STEP),
        capsys,
    )
    assert code == 0, err
    cfg, trained = _adapter(out)
    assert cfg["r"] == 8 and trained == 8 * 368 and "LoRA rank 8" in stdout
    assert sorted(cfg["target_modules"]) == [
        "lm_head", "model.embed_tokens", "model.layers.1.self_attn.v_proj"
    ]  # fmt: skip
    # with --lora-r 2 the modules are a prefix of the order: 320, 640, 736, 832, 928; + 192 > 1000
    out = tmp_path / "modules"
    code, _, err = run(
        base(
            model,
            data,
            out,
            "--method",
            "kappa-lora",
            "--budget-params",
            1000,
            "--lora-r",
            2,
            *ONE_STEP,
        ),
        capsys,
    )
    assert code == 0, err
    cfg, trained = _adapter(out)
    assert cfg["r"] == 2 and trained == 928 and len(cfg["target_modules"]) == 5
    assert "model.layers.1.mlp.down_proj" not in cfg["target_modules"]
    # plain LoRA: the rank is fitted on every linear layer (per rank 2 * (64 + 64 + 48 + 48 + 3 * 96))
    out = tmp_path / "lora"
    code, _, err = run(
        base(model, data, out, "--method", "lora", "--budget-params", 3000, *ONE_STEP), capsys
    )
    assert code == 0, err
    cfg, trained = _adapter(out)
    assert (cfg["r"], trained) == (2, 2 * 1024)


RESUME_ARGS = ["--method", "selective", "--budget-tensors", 3, "--checkpoint-every", 2]


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(model, data, run dir) of a run stopped right after its step-2 checkpoint."""
    root = tmp_path_factory.mktemp("interrupted")
    model = save_tiny_model(root / "tiny", seed=0)
    data = root / "train.txt"
    data.write_text(TEXT)
    out = root / "run"
    original = LocalEngine.save_checkpoint

    def interrupted(engine, folder, state):  # type: ignore[no-untyped-def]
        original(engine, folder, state)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalEngine, "save_checkpoint", interrupted)
        assert main([str(a) for a in base(model, data, out, *RESUME_ARGS)]) == 130
    return model, data, out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


class _Marker:
    """Unpickling this calls open(path, "w"): the file appears if the pickle ever runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _rewrite_trainable(ckpt: Path, change: str, frozen: str) -> None:
    from safetensors.torch import save_file

    from kappatune.training.checkpoint import LOOP_JSON, LOOP_TENSORS, TRAINABLE, write_manifest

    tensors = load_file(str(ckpt / TRAINABLE))
    first = sorted(tensors)[0]
    if change == "frozen":
        tensors[frozen] = torch.zeros_like(tensors[first])
    elif change == "shape":
        tensors[first] = tensors[first][:1]
    elif change == "dtype":
        tensors[first] = tensors[first].to(torch.float16)
    save_file(tensors, str(ckpt / TRAINABLE))
    write_manifest(ckpt, (TRAINABLE, LOOP_TENSORS, LOOP_JSON), {})


def _rewrite_loop(ckpt: Path, change: str) -> None:
    """Edit the loop state as a consistent writer would (files and manifest agree)."""
    from safetensors.torch import save_file

    from kappatune.training import checkpoint as ck

    state = ck.read_loop_state(ckpt)
    if change == "lr_text":
        state["optimizer"]["param_groups"][0]["lr"] = "fast"
    elif change == "scheduler_ahead":
        state["scheduler"]["last_epoch"] = 5
    elif change == "exp_avg_shape":
        entry = next(iter(state["optimizer"]["state"].values()))
        entry["exp_avg"] = torch.zeros(1)
    elif change == "extra_key":
        state["scheduler"]["lr_lambdas"] = [None]
        state["scheduler"]["evil"] = 1
    tensors: dict[str, torch.Tensor] = {}
    encoded = ck.encode_state(state, tensors)
    save_file(tensors, str(ckpt / ck.LOOP_TENSORS))
    (ckpt / ck.LOOP_JSON).write_text(json.dumps({"format": 1, "state": encoded}))
    ck.write_manifest(ckpt, (ck.TRAINABLE, ck.LOOP_TENSORS, ck.LOOP_JSON), {})


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "frozen",
            r"holds 1 tensor\(s\) this run does not train \(e.g. model.layers.1.mlp.down_proj.weight\)",
        ),
        ("shape", r"holds lm_head.weight as float32 \[1, 32\], the run trains float32 \[128, 32\]"),
        (
            "dtype",
            r"holds lm_head.weight as float16 \[128, 32\], the run trains float32 \[128, 32\]",
        ),
        ("truncated", r"has a damaged trainable.safetensors: \d+ bytes, the manifest says \d+"),
        ("flipped", r"has a damaged loop.safetensors: its digest differs from the manifest"),
        ("legacy", r"has no manifest.json \(incomplete, or written by an older kappatune\)"),
        (
            "lr_text",
            r"holds a loop state that does not fit this run \(optimizer.param_groups\[0\].lr is str, expected float\)",
        ),
        (
            "scheduler_ahead",
            r"holds a loop state that does not fit this run \(the scheduler is at step 5, the loop at 2\)",
        ),
        (
            "exp_avg_shape",
            r"holds an optimizer state that does not fit this run \(exp_avg of shape \[1\]",
        ),
        ("extra_key", r"holds a loop state that does not fit this run \(scheduler has keys"),
    ],
)
def test_resume_refuses_a_tampered_checkpoint(
    interrupted_run: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    import shutil

    model, data, original = interrupted_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    ckpt = out / "checkpoint"
    frozen = "model.layers.1.mlp.down_proj.weight"
    assert frozen not in Selection.load(out / "selection.json").names
    if case in ("frozen", "shape", "dtype"):
        _rewrite_trainable(ckpt, case, frozen)
    elif case == "truncated":
        path = ckpt / "trainable.safetensors"
        path.write_bytes(path.read_bytes()[:-7])
    elif case == "flipped":
        path = ckpt / "loop.safetensors"
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif case in ("lr_text", "scheduler_ahead", "exp_avg_shape", "extra_key"):
        _rewrite_loop(ckpt, case)
    elif case == "legacy":
        for p in list(ckpt.iterdir()):
            p.unlink()
        torch.save({"step": 2, "x": _Marker(tmp_path / "marker")}, ckpt / "loop.pt")
    before = _snapshot(out)
    code, _, err = run(base(model, data, out, *RESUME_ARGS), capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kappatune: error: checkpoint {ckpt} "), err
    assert re.search(message, lines[0]) and lines[0].endswith("; remove it to restart"), lines[0]
    assert _snapshot(out) == before  # nothing written, nothing trained
    assert not (tmp_path / "marker").exists()


def test_resume_never_unpickles_a_planted_loop_pt(
    interrupted_run: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    model, data, original = interrupted_run
    out = tmp_path / "run"
    shutil.copytree(original, out)
    marker = tmp_path / "marker"
    torch.save({"step": 2, "x": _Marker(marker)}, out / "checkpoint" / "loop.pt")
    code, stdout, err = run(base(model, data, out, *RESUME_ARGS), capsys)
    assert code == 0, err
    assert "resuming from step 2 of 3" in stdout
    assert not marker.exists()
    # the frozen tensors are bit-identical to the base model's
    names = set(Selection.load(out / "selection.json").names)
    trained = load_file(str(out / "model" / "model.safetensors"))
    start = load_file(str(model / "model.safetensors"))
    frozen = sorted(set(start) - names)
    assert len(frozen) == len(start) - 3
    assert all(torch.equal(trained[k], start[k]) for k in frozen)


def test_no_pack_reports_dropped_and_truncated_examples(
    setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows of 16 tokens hold <bos> and 15 more: "ab"+"cd"+<eos> fits, a 10-token prompt with
    an 11-token completion is cut, a 20-token prompt leaves no completion token: dropped."""
    model, _ = setup
    data = tmp_path / "mixed.jsonl"
    rows = [("ab", "cd"), ("0123456789", "abcdefghij"), ("p" * 20, "x")]
    data.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    out = tmp_path / "run"
    argv = base(model, data, out, "--method", "full", "--no-pack")
    code, _, err = run(argv, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("kappatune: warning:")]
    assert warnings == [
        "kappatune: warning: --no-pack with --seq-len 16: 1 example(s) dropped"
        " (completion starts past the row), 1 truncated"
    ]
    result = json.loads((out / "result.json").read_text())
    assert (result["dropped_examples"], result["truncated_examples"]) == (1, 1)


@pytest.mark.parametrize(
    "flags", [["--bf16"], ["--gradient-checkpointing"], ["--bf16", "--gradient-checkpointing"]]
)
def test_bf16_and_gradient_checkpointing_train_only_the_selection(
    setup: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
) -> None:
    """bfloat16 autocast and gradient checkpointing: the selected tensors change, every frozen
    tensor is bit-identical, the weights stay float32; checkpointing alone gives the losses of a
    plain run (the activations are recomputed, not changed)."""
    model, data = setup
    args = ["--method", "selective", "--budget-tensors", 3]
    plain = tmp_path / "plain"
    assert run(base(model, data, plain, *args), capsys)[0] == 0
    out = tmp_path / "run"
    code, _, err = run(base(model, data, out, *args, *flags), capsys)
    assert code == 0, err
    record = json.loads((out / "run.json").read_text())
    assert record.get("bf16", False) == ("--bf16" in flags)
    assert record.get("gradient_checkpointing", False) == ("--gradient-checkpointing" in flags)
    assert "bf16" not in json.loads((plain / "run.json").read_text())  # earlier records match
    names = set(Selection.load(out / "selection.json").names)
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert {n for n in before if not before[n].equal(after[n])} == names
    assert all(t.dtype == torch.float32 for t in after.values())
    got = json.loads((out / "result.json").read_text())["losses"]
    want = json.loads((plain / "result.json").read_text())["losses"]
    if flags == ["--gradient-checkpointing"]:
        assert got == pytest.approx(want, rel=1e-6)
    else:
        # bf16 rounding: the first step's loss (before any update) agrees to about 1e-3, the
        # run itself differs
        assert got != want and got[0] == pytest.approx(want[0], rel=1e-2)
    # the same command resumes as the same run (the flags are part of its record)
    assert run(base(model, data, out, *args, *flags), capsys)[0] == 0
