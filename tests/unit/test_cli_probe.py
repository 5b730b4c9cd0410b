"""``kappatune probe`` end to end on a tiny saved model, and its bad-input exits."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kappatune.cli.main import main
from tests.unit._tiny_models import save_tiny_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 3  # about 480 characters: 15 rows of 32 tokens


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "data.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


def _args(tiny_dir: Path, text_file: Path, out: Path, *extra: str, plot: bool = True) -> list[str]:
    return [
        "probe", str(tiny_dir), "--data", str(text_file), "--tokens", "200", "--seq-len", "32",
        "--bootstrap", "50", "--output", str(out / "p.json"), "--csv", str(out / "p.csv"),
        *(["--plot", str(out / "p.png")] if plot else []), *extra,
    ]  # fmt: skip


def test_probe_writes_json_csv_plot_and_prints_tables(
    tiny_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(_args(tiny_dir, text_file, out)) == 0
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1].startswith("Conclusion: ")
    assert "rank correlation of kappa with true Fisher" in printed
    assert "rank correlation of kappa with empirical Fisher" in printed
    report = json.loads((out / "p.json").read_text())
    assert report["schema_version"] == 1 and report["kind"] == "kappatune.probe.run"
    assert report["settings"] == {
        "kinds": ["true", "empirical"], "tokens": 200, "seq_len": 32, "lambda": 1e-8, "samples": 1,
        "seed": 0, "bootstrap": 50, "confidence": 0.95,
    }  # fmt: skip
    assert report["fisher"] == {
        "true": {"tokens": 200, "examples": 7},
        "empirical": {"tokens": 200, "examples": 7},
    }
    assert report["data"]["files"][0]["bytes"] == len(TEXT.encode())
    assert report["data"]["sequences"] * 31 >= report["data"]["label_tokens"] >= 200
    # 2 layers x 7 projections + embed_tokens + lm_head, in model order
    names = [r["name"] for r in report["rows"]]
    assert (
        len(names) == 16
        and names[0] == "model.embed_tokens.weight"
        and names[-1] == "lm_head.weight"
    )
    assert all(
        r["fisher"]["true"]["mean"] > 0 and r["fisher"]["empirical"]["sum"] > 0
        for r in report["rows"]
    )
    groups = {c["group"] for c in report["correlations"]}
    assert groups == {
        "all",
        "embed_tokens",
        "lm_head",
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert (
        len(report["correlations"]) == 2 * 3 * len(groups) * 2
    )  # kinds x measures x groups x methods
    overall = [c for c in report["correlations"] if c["group"] == "all"]
    assert all(
        c["n"] == 16 and -1 <= c["estimate"] <= 1 and c["ci_low"] <= c["ci_high"] for c in overall
    )
    singles = [c for c in report["correlations"] if c["group"] == "lm_head"]
    assert all(c["n"] == 1 and c["estimate"] is None for c in singles)
    with (out / "p.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == names
    assert float(table[3]["kappa"]) == pytest.approx(report["rows"][3]["kappa"])
    assert float(table[3]["empirical_logvol"]) == pytest.approx(
        report["rows"][3]["fisher"]["empirical"]["logvol"]
    )
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_is_deterministic_and_seed_changes_true_fisher(
    tiny_dir: Path, text_file: Path, tmp_path: Path
) -> None:
    runs = []
    for i, seed in enumerate(("3", "3", "4")):
        out = tmp_path / f"o{i}"
        assert (
            main(_args(tiny_dir, text_file, out, "--seed", seed, "--kind", "true", plot=False)) == 0
        )
        runs.append(json.loads((out / "p.json").read_text()))
    strip = lambda r: {k: v for k, v in r.items() if k != "timings_s"}  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert runs[0]["rows"] != runs[2]["rows"]
    assert list(runs[0]["fisher"]) == ["true"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "100000"], "fewer than the token budget of 100000"),
        (["--seq-len", "1"], "--seq-len must be at least 2"),
        (["--lambda", "0"], "--lambda must be a positive finite number, got 0.0"),
        (["--bootstrap", "-1"], "--bootstrap must be 0 or more, got -1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    tiny_dir: Path, text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], message: str,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    assert main([*_args(tiny_dir, text_file, out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kappatune: error: ") and message in err and "\n" not in err
    assert not out.exists()


def test_missing_data_file(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(_args(tiny_dir, tmp_path / "nope.txt", out)) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"kappatune: error: no such data file: {tmp_path / 'nope.txt'}"
    )
    assert not out.exists()


def test_too_short_data_names_the_numbers(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("tiny text", encoding="utf-8")  # 9 characters + EOS: 10 predicted tokens
    out = tmp_path / "out"
    assert main(_args(tiny_dir, short, out)) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "kappatune: error: the data has 10 predicted tokens in 1 examples, fewer than the token"
        " budget of 200 (lower --tokens or add data)"
    )
    assert not out.exists()


def _corr(estimate: float | None, lo: float | None, hi: float | None, n: int = 127) -> dict:
    return {"kind": "true", "measure": "mean", "group": "all", "method": "spearman", "n": n,
            "estimate": estimate, "ci_low": lo, "ci_high": hi, "confidence": 0.95}  # fmt: skip


def test_probe_conclusion_is_one_plain_line() -> None:
    from kappatune.probe.run import conclusion

    other = {**_corr(0.9, 0.8, 0.95), "kind": "empirical"}
    tail = "95 % interval [-0.64, -0.40], true Fisher per parameter, 127 matrices)."
    assert conclusion([other, _corr(-0.54, -0.64, -0.40)], ["true", "empirical"]) == (
        "Conclusion: kappa and Fisher disagree: matrices with a higher kappa carry less"
        " information, against KappaTune's premise (Spearman -0.54, " + tail
    )
    assert conclusion([_corr(0.3, 0.1, 0.5, 16)], ["true"]) == (
        "Conclusion: kappa and Fisher agree: matrices with a higher kappa carry more information"
        " (Spearman +0.30, 95 % interval [+0.10, +0.50], true Fisher per parameter, 16 matrices)."
    )
    assert conclusion([_corr(0.05, -0.2, 0.3, 16)], ["true"]).startswith(
        "Conclusion: no clear relation between kappa and Fisher (Spearman +0.05,"
    )
    assert conclusion([_corr(None, None, None, 2)], ["true"]) == (
        "Conclusion: too few matrices (2) to say whether kappa and Fisher agree."
    )
