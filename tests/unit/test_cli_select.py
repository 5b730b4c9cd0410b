from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kappatune.analysis.spectra import Analysis, SkippedRow
from kappatune.cli.main import main
from kappatune.selection.core import Selection
from tests.unit._tiny_models import save_tiny_model
from tests.unit.test_selection import ROWS


@pytest.fixture
def analysis_json(tmp_path: Path) -> Path:
    path = tmp_path / "spectra.json"
    rows = tuple(
        r for r in ROWS if r.kappa == r.kappa
    )  # JSON keeps NaN as null; drop it for clarity
    Analysis("tiny-src", "fp123", rows, (SkippedRow("model.norm.weight", (760,), "1-D"),)).save(
        path
    )
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_select_json_from_analysis(
    analysis_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "sel.json"
    code, out, err = run(
        ["select", str(analysis_json), "--budget-tensors", "3", "-o", str(out_file)], capsys
    )
    assert code == 0, err
    sel = Selection.load(out_file)
    assert [(e.name, e.expert) for e in sel.entries] == [
        ("model.layers.0.self_attn.v_proj.weight", None),
        ("model.layers.1.self_attn.v_proj.weight", None),
        ("model.layers.1.mlp.experts.down_proj", 0),
    ]
    assert sel.source == "tiny-src" and sel.fingerprint == "fp123" and sel.total_params == 2000
    assert "lowest-kappa, 3 tensors: 3 of 9 candidates, 110 parameters (5.50% of the model)" in out
    assert "model.layers.1.mlp.experts.down_proj" in out and "wrote json" in out


def test_select_axolotl_and_peft_with_filters(
    analysis_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ax = tmp_path / "unfrozen.yaml"
    code, _, err = run(
        [
            "select",
            str(analysis_json),
            "--policy",
            "highest-kappa",
            "--module-types",
            "q_proj",
            "up_proj",
            "--quota",
            "q_proj=1",
            "--quota",
            "up_proj=1",
            "--format",
            "axolotl",
            "-o",
            str(ax),
        ],
        capsys,
    )
    assert code == 0, err
    assert yaml.safe_load(ax.read_text())["unfrozen_parameters"] == [
        "^model.layers.1.mlp.up_proj.weight$",
        "^model.layers.0.self_attn.q_proj.weight$",
    ]
    peft = tmp_path / "targets.json"
    code, _, err = run(
        [
            "select",
            str(analysis_json),
            "--budget-params",
            "4%",
            "--exclude",
            "experts",
            "--format",
            "peft",
            "-o",
            str(peft),
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(peft.read_text()) == {
        "target_modules": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"],
        "target_parameters": None,
    }


def test_select_default_budget_and_random(
    analysis_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "r.json"
    code, out, _ = run(
        ["select", str(analysis_json), "--policy", "random", "--seed", "4", "-o", str(out_file)],
        capsys,
    )
    assert code == 0
    first = Selection.load(out_file)
    assert (
        first.entry_count == 1 and first.budget is not None and first.budget.fraction == 0.2
    )  # int(9 * 0.2)
    run(
        ["select", str(analysis_json), "--policy", "random", "--seed", "4", "-o", str(out_file)],
        capsys,
    )
    assert Selection.load(out_file) == first
    code, out, err = run(
        ["select", str(analysis_json), "--policy", "last-layers", "--last-layers", "1"], capsys
    )
    assert code == 0 and "5 of 5 candidates" in err
    assert [e["name"] for e in json.loads(out)["entries"]][:1] == [
        "model.layers.1.self_attn.v_proj.weight"
    ]


@pytest.mark.parametrize("output", [[], ["-o", "-"], ["--output", "-"]])
def test_select_export_to_stdout_alone(
    analysis_json: Path, output: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        ["select", str(analysis_json), "--budget-tensors", "2", "--format", "peft", *output], capsys
    )
    assert code == 0, err
    assert json.loads(out) == {  # stdout holds the export and nothing else
        "target_modules": ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"],
        "target_parameters": None,
    }
    assert "lowest-kappa, 2 tensors" in err and "wrote" not in err


def test_select_table_says_what_it_hides_and_whether_a_prefix(
    analysis_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "s.json"
    argv = ["select", str(analysis_json), "--budget-params", "250", "-o", str(out_file)]
    code, out, err = run([*argv, "--top", "1"], capsys)
    assert code == 0, err
    # 40 + 40 + 30 + 30 = 140; the next, up_proj0 (200), does not fit
    assert "the selection is a prefix of the lowest-kappa order: its first 4 candidates" in out
    assert "1 of 4 rows (3 more not shown; --top 4 shows all)" in out
    assert "140 parameters" in out and "110 short of the 250-parameter budget" in out
    code, out, err = run([*argv, "--fill", "greedy"], capsys)
    assert code == 0, err
    # greedy skips up_proj0 and the embedding, then takes q_proj0 (100)
    assert "NOT a prefix of the lowest-kappa order: 2 earlier candidate(s) left out" in out
    assert "5 of 5 rows" in out and "not shown" not in out
    assert [e.name for e in Selection.load(out_file).entries][-1] == (
        "model.layers.0.self_attn.q_proj.weight"
    )


def test_select_computes_analysis_from_model_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny")
    out_file = tmp_path / "sel.json"
    code, _, err = run(
        ["select", str(model_dir), "--budget-params", "20%", "-o", str(out_file)], capsys
    )
    assert code == 0, err
    sel = Selection.load(out_file)
    total = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3) + 2 * 128 * 32 + 2 * 2 * 32 + 32
    assert sel.total_params == total and sel.budget_params == total * 20 // 100
    # the embedding has the lowest kappa (2.7); the head (4,096) would overshoot the 5,356 budget
    assert sel.names == ("model.embed_tokens.weight",) and sel.shortfall == 5356 - 4096
    assert sel.source == str(model_dir)
    code, _, err = run(["select", str(model_dir), "--budget-params", "5%"], capsys)
    assert code == 2 and err.strip() == (
        "kappatune: error: parameter budget 1,339 is smaller than the first candidate in order,"
        " model.embed_tokens.weight (4,096 parameters); --fill greedy skips to smaller ones"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget-tensors", "10"], "budget of 10 tensors exceeds the 9 candidates"),
        (
            ["--budget-params", "2001"],
            "parameter budget 2,001 exceeds the 1,240 parameters of the 9 candidates",
        ),
        (["--kappa-max", "2"], r"no candidate has kappa <= 2 \(lowest of 9 is 3\)"),
        (["--include", "nothing"], "leave 0 of 9 candidates"),
        (
            ["--policy", "smallest"],
            r"--policy: invalid choice: 'smallest' \(choose from 'all', 'fisher'",
        ),
        (["--policy", "fisher"], "--policy fisher needs --fisher-scores"),
        (["--policy", "last-layers"], "--policy last-layers needs --last-layers N"),
        (["--quota", "v_proj"], "cannot read quota 'v_proj': expected TYPE=N"),
        (["--budget-params", "lots"], "cannot read parameter budget 'lots'"),
        (["--budget-fraction", "1.5"], r"budget fraction must be in \(0, 1\], got 1.5"),
        (["--module-types", "o_proj"], r"unknown module type\(s\) o_proj"),
        (["--format", "axolotl"], r"should end in \.yaml or \.yml for --format axolotl"),
    ],
)
def test_select_bad_input_one_line_exit_2_nothing_written(
    analysis_json: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    out_file = tmp_path / "out" / "sel.json"
    code, _out, err = run(["select", str(analysis_json), *extra, "-o", str(out_file)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: "), err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out_file.exists() and not out_file.parent.exists()


def test_select_missing_source_and_exclusive_budgets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["select", str(tmp_path / "none.json"), "-o", str(tmp_path / "s.json")], capsys
    )
    assert code == 2 and "no such analysis file" in err
    assert main(["select", "x.json", "--budget-tensors", "2", "--budget-fraction", "0.5"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "kappatune: error: argument --budget-fraction: not allowed with argument --budget-tensors"
    ]
    assert list(tmp_path.iterdir()) == []


def test_select_fisher_policy_from_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kappatune.analysis.fisher import fisher_scores_for

    model_dir = save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    out_file = tmp_path / "f.json"
    argv = ["select", str(model_dir), "--policy", "fisher", "--fisher-data", str(text), "--fisher-tokens", "40",
            "--budget-tensors", "4", "-o", str(out_file)]  # fmt: skip
    code, _, err = run(argv, capsys)
    assert code == 0, err
    scores = fisher_scores_for(model_dir, [text], tokens=40, seed=0)
    expected = sorted(scores, key=lambda k: (scores[k], k))[:4]
    assert [e.key for e in Selection.load(out_file).entries] == expected


def test_a_registered_policy_gets_the_fisher_scores_it_declares(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kappatune.analysis.fisher import fisher_scores_for
    from kappatune.selection import policies

    monkeypatch.setattr(policies, "_POLICIES", dict(policies._POLICIES))

    @policies.register_policy("test-most-fisher", policies.PolicySpec(task_fisher=True))
    def most_fisher(rows, ctx):  # type: ignore[no-untyped-def]
        return sorted(rows, key=lambda r: (-ctx.scores[r.key], r.key))

    model_dir = save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    out_file = tmp_path / "f.json"
    argv = ["select", str(model_dir), "--policy", "test-most-fisher", "--budget-tensors", "3"]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "kappatune: error: --policy test-most-fisher needs --fisher-scores FILE or --fisher-data FILE..."
    )
    argv += ["--fisher-data", str(text), "--fisher-tokens", "40", "-o", str(out_file)]
    code, _, err = run(argv, capsys)
    assert code == 0, err
    scores = fisher_scores_for(model_dir, [text], tokens=40, seed=0)
    expected = sorted(scores, key=lambda k: (-scores[k], k))[:3]
    assert [e.key for e in Selection.load(out_file).entries] == expected
    assert policies.policy_names(lambda spec: spec.task_fisher) == (
        "fisher",
        "interference",
        "test-most-fisher",
    )


def _edit_first_row(path: Path, **changes: object) -> None:
    doc = json.loads(path.read_text())
    doc["tensors"][0].update(changes)
    path.write_text(json.dumps(doc))


FIRST = "model.embed_tokens.weight"


@pytest.mark.parametrize(
    ("case", "extra", "message"),
    [
        (
            "all_nan",
            ["--budget-tensors", "1"],
            "policy 'lowest-kappa': none of the 9 candidates has a kappa (all are NaN);"
            " re-run the analysis or choose another policy",
        ),
        (
            "budget_inf",
            ["--budget-params", "1e400"],
            "parameter budget '1e400' is too large (the limit is 9.01e+15 parameters)",
        ),
        (
            "percent_150",
            ["--budget-params", "150%"],
            "parameter budget '150%': a percentage must be in (0, 100]",
        ),
        (
            "percent_0",
            ["--budget-params", "0%"],
            "parameter budget '0%': a percentage must be in (0, 100]",
        ),
        (
            "numel_inf",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): numel must be a whole number >= 1, got inf",
        ),
        (
            "numel_neg",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): numel must be a whole number >= 1, got -5",
        ),
        (
            "numel_big",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): numel 501 contradicts shape [500, 1] (500 elements)",
        ),
        (
            "kappa_neg",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): kappa must be >= 1 or null, got -3.5",
        ),
        (
            "sigma_neg",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): sigma_min must be >= 0 or null, got -1",
        ),
        (
            "kappa_text",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): kappa must be a number, \"inf\" or null, got 'big'",
        ),
        (
            "shape_neg",
            [],
            f"malformed analysis JSON: tensors[0] ({FIRST}): each dimension of shape must be a whole number >= 0, got -8",
        ),
        (
            "layer_text",
            ["--policy", "last-layers", "--last-layers", "1"],
            f"malformed analysis JSON: tensors[0] ({FIRST}): layer must be a whole number >= 0, got 'x'",
        ),
        (
            "row_not_object",
            [],
            "malformed analysis JSON: tensors[0]: a row must be a JSON object, got list",
        ),
        (
            "skipped_shape",
            [],
            "malformed analysis JSON: skipped[0] (model.norm.weight): each dimension of shape must be a whole number >= 0, got 1.5",
        ),
    ],
)
def test_select_hostile_analysis_and_budgets(
    analysis_json: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    extra: list[str],
    message: str,
) -> None:
    if case == "all_nan":
        doc = json.loads(analysis_json.read_text())
        for r in doc["tensors"]:
            r["kappa"] = None
        analysis_json.write_text(json.dumps(doc))
    elif case == "row_not_object":
        doc = json.loads(analysis_json.read_text())
        doc["tensors"][0] = [1, 2]
        analysis_json.write_text(json.dumps(doc))
    elif case == "skipped_shape":
        doc = json.loads(analysis_json.read_text())
        doc["skipped"][0]["shape"] = [1.5]
        analysis_json.write_text(json.dumps(doc))
    elif case.startswith(("numel", "kappa", "sigma", "shape", "layer")):
        text = analysis_json.read_text()
        change = {
            "numel_inf": ("numel", None),
            "numel_neg": ("numel", -5),
            "numel_big": ("numel", 501),
            "kappa_neg": ("kappa", -3.5),
            "sigma_neg": ("sigma_min", -1),
            "kappa_text": ("kappa", "big"),
            "shape_neg": ("shape", [-8, 8]),
            "layer_text": ("layer", "x"),
        }[case]
        _edit_first_row(analysis_json, **{change[0]: change[1]})
        if case == "numel_inf":  # JSON 1e999 parses as an infinite float
            text = analysis_json.read_text().replace('"numel": null', '"numel": 1e999')
            analysis_json.write_text(text)
    out_file = tmp_path / "sel.json"
    code, _, err = run(["select", str(analysis_json), *extra, "-o", str(out_file)], capsys)
    assert code == 2, err
    assert err.strip().splitlines() == [f"kappatune: error: {message}"]
    assert not out_file.exists()


def test_select_kappa_max_inf_keeps_every_finite_kappa(
    analysis_json: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_file = tmp_path / "sel.json"
    code, _out, err = run(
        ["select", str(analysis_json), "--kappa-max", "inf", "-o", str(out_file)], capsys
    )
    assert code == 0, err
    doc = json.loads(out_file.read_text())
    assert doc["budget"] == {"kappa_max": "inf"}
    sel = Selection.load(out_file)
    assert sel.budget is not None and sel.budget.kappa_max == float("inf")
    assert sel.entry_count == 9  # every row of the analysis, the kappa = inf one too


@pytest.mark.parametrize(
    ("policy", "extra", "message"),
    [
        ("self-fisher", [], "has no config.json: not a Hugging Face model directory"),
        ("interference", ["--fisher-data", "x.txt"], "has no config.json"),
        ("fisher", ["--fisher-data", "x.txt"], "has no config.json"),
    ],
)
def test_a_scoring_policy_refuses_an_unloadable_model_before_analysing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    policy: str,
    extra: list[str],
    message: str,
) -> None:
    from kappatune.analysis import spectra

    model = save_tiny_model(tmp_path / "model")
    (model / "config.json").unlink()  # weights alone: analysable, but not a loadable causal LM
    (tmp_path / "x.txt").write_text("some task text\n" * 20, encoding="utf-8")

    def no_analysis(*args: object, **kwargs: object) -> None:
        raise AssertionError("analysed before refusing")

    monkeypatch.setattr(spectra, "analyze", no_analysis)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "sel.json"
    capsys.readouterr()  # the model's own save messages
    assert main(["select", str(model), "--policy", policy, *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not out.exists()


def test_select_prints_the_next_step_and_its_peft_code_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """After writing an export, select says what to do with it; the PEFT lines it prints run
    as they are against PEFT's own LoraConfig and get_peft_model."""
    from peft import PeftModel

    from tests.unit._tiny_models import save_tiny_model, tiny_llama

    model_dir = save_tiny_model(tmp_path / "tiny")
    sel = tmp_path / "sel.json"
    lin = ["--exclude", "embed|lm_head"]  # the linear layers (the tiny model's embedding is big)
    assert main(["select", str(model_dir), *lin, "--budget-params", "3000", "-o", str(sel)]) == 0
    err = "".join(capsys.readouterr())
    train = f"kappatune train {model_dir} --data DATA --output RUN --selection {sel}"
    assert f"next: train only these matrices: {train} --method selective" in err
    assert "--method kappa-lora --lora-r " in err
    targets = tmp_path / "t.json"
    args = ["select", str(model_dir), *lin, "--budget-params", "3000", "--format", "peft", "-o"]
    assert main([*args, str(targets)]) == 0
    err = "".join(capsys.readouterr())
    code = [ln[2:] for ln in err.splitlines() if ln.startswith("  ")]
    assert code[0].startswith("import json; from peft import LoraConfig")
    scope: dict[str, object] = {"model": tiny_llama()}
    exec("\n".join(code), scope)  # the printed snippet, as a user would paste it
    peft_model = scope["model"]
    assert isinstance(peft_model, PeftModel)
    wanted = set(json.loads(targets.read_text())["target_modules"])
    adapted = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.")
               for n, _ in peft_model.named_parameters() if ".lora_A" in n}  # fmt: skip
    assert {a.removesuffix(".default") for a in adapted} == wanted
    # an analysis JSON as the source: the train command names the model to give
    analysis = tmp_path / "a.json"
    assert main(["analyze", str(model_dir), "--no-cache", "-o", str(analysis)]) == 0
    capsys.readouterr()
    assert main(["select", str(analysis), "--budget-tensors", "2", "-o", str(sel)]) == 0
    assert "next: train only these matrices: kappatune train MODEL --data" in "".join(
        capsys.readouterr()
    )
    axo = tmp_path / "u.yaml"
    assert (
        main(
            [
                "select",
                str(model_dir),
                "--budget-tensors",
                "2",
                "--format",
                "axolotl",
                "-o",
                str(axo),
            ]
        )
        == 0
    )
    assert f"copy the unfrozen_parameters list of {axo}" in "".join(capsys.readouterr())
