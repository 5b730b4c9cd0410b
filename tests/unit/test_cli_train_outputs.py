"""``kappatune train``: watching a run (lines, log.jsonl, eval loss) and outputs that travel."""

from __future__ import annotations

import argparse
import json
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kappatune.cli.main import build_parser, main
from kappatune.training.run_log import RunLog
from tests.unit._tiny_models import char_tokenizer, save_tiny_model, tiny_llama

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6
EVAL = "how vexingly quick daft zebras jump! sphinx of black quartz, judge my vow.\n" * 3
LINE = re.compile(
    r"^step (\d)/5  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  [\d,]+ tok/s  elapsed \d:\d\d:\d\d"
    r"(  eval loss \d+\.\d{4})?$"
)


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = save_tiny_model(tmp_path / "tiny", seed=0)
    (tmp_path / "train.txt").write_text(TEXT)
    (tmp_path / "eval.txt").write_text(EVAL)
    return model, tmp_path / "train.txt", tmp_path / "eval.txt"


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def base(model: object, data: Path, out: Path, *extra: object) -> list[object]:
    return ["train", model, "--data", data, "--output", out, "--steps", 5, "--batch-size", 2,
            "--seq-len", 16, "--lr", 1e-2, *extra]  # fmt: skip


def test_lines_log_jsonl_eval_loss_and_resume_without_duplicates(
    files: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from transformers import AutoModelForCausalLM

    from kappatune.training.data import PackConfig, load_examples, tokenize
    from kappatune.training.loop import evaluate_loss

    model, data, eval_file = files
    args = ["--method", "selective", "--budget-tensors", 2, "--checkpoint-every", 2,
            "--eval-data", eval_file, "--eval-every", 2]  # fmt: skip
    original = RunLog.write

    def killed_after_step_3(self: RunLog, line: Any) -> None:
        original(self, line)
        if line.record.step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunLog, "write", killed_after_step_3)
    out = tmp_path / "run"
    code, stdout, err = run(base(model, data, out, *args), capsys)
    assert code == 130, err
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # step 3 is logged, the checkpoint is at step 2
    monkeypatch.setattr(RunLog, "write", original)
    code, stdout, err = run(base(model, data, out, *args), capsys)
    assert code == 0, err
    assert err == ""  # no third-party noise
    lines = [x for x in stdout.splitlines() if x.startswith("step ")]
    got = [LINE.match(x) for x in lines]
    assert all(got), lines
    assert [(int(m.group(1)), m.group(2) is not None) for m in got if m] == [
        (3, False),
        (4, True),
        (5, True),
    ]
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4, 5]
    assert [sorted(r) for r in records[:1]] == [
        ["elapsed_s", "loss", "lr", "step", "step_s", "tokens", "tokens_per_s", "total_steps"]
    ]
    assert all(r["lr"] == 1e-2 and r["tokens"] == 32 for r in records)
    result = json.loads((out / "result.json").read_text())
    assert result["losses"][2:] == [r["loss"] for r in records[2:]]
    assert [e["step"] for e in result["eval"]] == [2, 4, 5]
    assert result["final_eval_loss"] == records[-1]["eval_loss"]
    # the saved model loads with transformers and gives the logged eval loss (token-weighted)
    saved = AutoModelForCausalLM.from_pretrained(out / "model")
    eval_data = tokenize(char_tokenizer(), load_examples([eval_file]), PackConfig(seq_len=16))
    assert evaluate_loss(saved, eval_data, batch_size=2) == pytest.approx(
        result["final_eval_loss"], rel=1e-5
    )
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "library_name: transformers" in card
    assert "- final evaluation loss: " in card and "2 matrices chosen by the `lowest-kappa`" in card


def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny model as ``owner/tiny`` in a private Hugging Face cache (offline)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    repo = cache / "models--owner--tiny"
    save_tiny_model(repo / "snapshots" / ("a" * 40), seed=0)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return repo / "snapshots" / ("a" * 40)


def test_adapter_names_its_base_portably_and_loads_with_peft(
    files: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    snapshot = hub_cache(tmp_path, monkeypatch)
    _, data, _ = files
    out = tmp_path / "kl"
    code, _, err = run(
        base("owner/tiny", data, out, "--method", "kappa-lora", "--budget-tensors", 2), capsys
    )
    assert code == 0, err
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "owner/tiny"  # not the cache snapshot path
    card = (out / "adapter" / "README.md").read_text()
    assert card.startswith(
        "---\nbase_model: owner/tiny\nlibrary_name: peft\ntags:\n- kappatune\n- kappa-lora\n- lora\n---\n"
    )
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(snapshot), out / "adapter"
    )
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(peft_model)
    assert sorted(loaded) == sorted(saved)
    assert sum("lora_" in k for k in saved) == 4  # A and B of the 2 selected modules
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def save_bf16_model(path: Path) -> Path:
    tiny_llama(0).to(torch.bfloat16).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("flag", "want"), [((), torch.bfloat16), (("--save-dtype", "float32"), torch.float32)]
)
def test_model_keeps_the_checkpoint_dtype_unless_asked(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flag: tuple[str, ...],
    want: torch.dtype,
) -> None:
    from transformers import AutoModelForCausalLM

    model = save_bf16_model(tmp_path / "bf16")
    (tmp_path / "d.txt").write_text(TEXT)
    out = tmp_path / "run"
    code, _, err = run(
        base(model, tmp_path / "d.txt", out, "--method", "selective", "--budget-tensors", 1, *flag),
        capsys,
    )
    assert code == 0, err
    assert {t.dtype for t in load_file(str(out / "model" / "model.safetensors")).values()} == {want}
    assert AutoModelForCausalLM.from_pretrained(out / "model").lm_head.weight.shape == (128, 32)


def test_push_to_hub_uploads_the_output_folder(
    files: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeApi:
        def create_repo(self, **kw: Any) -> str:
            calls.append(("create_repo", kw))
            return "https://huggingface.co/me/run"

        def upload_folder(self, **kw: Any) -> None:
            calls.append(
                (
                    "upload_folder",
                    kw | {"files": sorted(p.name for p in Path(kw["folder_path"]).iterdir())},
                )
            )

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    model, data, _ = files
    out = tmp_path / "run"
    code, stdout, err = run(
        base(
            model,
            data,
            out,
            "--method",
            "full",
            "--steps",
            1,
            "--push-to-hub",
            "me/run",
            "--hub-private",
        ),
        capsys,
    )
    assert code == 0, err
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[0][1] == {
        "repo_id": "me/run",
        "repo_type": "model",
        "private": True,
        "exist_ok": True,
    }
    assert calls[1][1]["folder_path"] == str(out / "model")
    assert calls[1][1]["files"] == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert stdout.splitlines()[-1] == "pushed model/ to https://huggingface.co/me/run"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--eval-every", 2], "--eval-every needs --eval-data FILE"),
        (["--report-to", "none", "tensorboard"], "--report-to none cannot be combined"),
        (["--hub-private"], "--hub-private needs --push-to-hub REPO_ID"),
        (["--push-to-hub", "a/b/c"], "'a/b/c' is not a hub repository id"),
        (
            ["--method", "lora", "--save-dtype", "bfloat16"],
            "--save-dtype applies to --method selective or full",
        ),
        (["--log-every", 0], "--log-every must be at least 1, got 0"),
    ],
)
def test_bad_watch_and_output_flags(
    files: tuple[Path, Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[object],
    message: str,
) -> None:
    model, data, _ = files
    argv = base(model, data, tmp_path / "o", *extra)
    if "--method" not in extra:
        argv += ["--method", "full"]
    code, _, err = run(argv, capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_every_train_flag_has_help() -> None:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    missing = sorted(a.dest for a in train._actions if not a.help)
    assert missing == []


def test_quiet_third_party_is_scoped() -> None:
    import logging

    from kappatune.cli.quiet import quiet_third_party

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    ds = logging.getLogger("DeepSpeed")
    handler = Keep()
    ds.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_third_party():
                ds.warning("Setting accelerator to CPU. If you have GPU ...")
                ds.warning("a real DeepSpeed problem")
                warnings.warn_explicit(
                    "old API", FutureWarning, "x.py", 1, module="transformers.modeling_utils"
                )
                warnings.warn_explicit("user's own", FutureWarning, "y.py", 1, module="mycode")
            ds.warning("Setting accelerator to CPU again")
            warnings.warn_explicit(
                "old API", FutureWarning, "x.py", 2, module="transformers.modeling_utils"
            )
    finally:
        ds.removeHandler(handler)
    assert seen == ["a real DeepSpeed problem", "Setting accelerator to CPU again"]
    assert [str(w.message) for w in caught] == ["user's own", "old API"]


@pytest.mark.parametrize("terminal", [True, False])
def test_watch_bar_in_a_terminal_lines_otherwise(tmp_path: Path, terminal: bool) -> None:
    from kappatune.cli.train_watch import Display
    from kappatune.training.loop import StepRecord
    from kappatune.training.run_log import StepWatch

    printed: list[str] = []
    evals = iter([2.5, 2.25])
    display = Display(total=5, start=0, log_every=2, print_line=printed.append, terminal=terminal)
    watch = StepWatch(RunLog(tmp_path), evaluate=lambda: next(evals), eval_every=3, display=display)
    for s in range(1, 6):
        watch(StepRecord(s, 5, 3.0, 1e-3, 10, 0.1))
    if terminal:
        assert display.bar is not None and display.bar.n == 5 and printed == []
    else:
        # every 2nd step, the eval steps (3 and the last) and the last step
        assert [x.split("/")[0] for x in printed] == ["step 2", "step 3", "step 4", "step 5"]
        assert printed[1].endswith("eval loss 2.5000") and printed[3].endswith("eval loss 2.2500")
    watch.close()
    assert watch.log.evals() == [{"step": 3, "eval_loss": 2.5}, {"step": 5, "eval_loss": 2.25}]
    assert watch.eval_summary() == {
        "eval": [{"step": 3, "eval_loss": 2.5}, {"step": 5, "eval_loss": 2.25}],
        "final_eval_loss": 2.25,
    }
