import subprocess
import sys
from pathlib import Path

from kappatune.cli.main import main


def test_help_and_import_do_not_load_heavy_libraries() -> None:
    code = (
        "import sys, kappatune, kappatune.cli.main as m\n"
        "m.build_parser()\n"
        "heavy = sorted(x for x in ('torch', 'transformers', 'peft', 'matplotlib', 'scipy') if x in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_lazy_api_attributes() -> None:
    import kappatune

    assert kappatune.analyze.__module__ == "kappatune.analysis.spectra"
    assert kappatune.AnalyzeOptions.__name__ == "AnalyzeOptions"


def test_no_command_prints_help_and_exits_2(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def _help(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    assert main([*argv, "--help"]) == 0
    return capsys.readouterr().out


def test_every_help_text_prints_plain_percent_signs(capsys) -> None:  # type: ignore[no-untyped-def]
    from kappatune.cli.main import COMMANDS

    texts = {"": _help([], capsys)} | {c: _help([c], capsys) for c in COMMANDS}
    assert set(texts) == {"", "demo", "analyze", "select", "train", "bench", "probe", "env"}
    for command, text in texts.items():
        assert "%%" not in text, command
    assert "--budget-params 10% --format peft" in texts[""]
    assert "or P% of the model (default: 2%)" in texts["bench"]


def test_version(capsys) -> None:  # type: ignore[no-untyped-def]
    import kappatune

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kappatune {kappatune.__version__}\n"


def test_every_public_name_imports_from_its_module() -> None:
    import kappatune

    lazy = set(kappatune.__all__) - {"KappaTuneError", "__version__"}
    assert lazy == set(kappatune._LAZY)
    assert {
        "analyze", "AnalyzeOptions", "select", "Budget", "SelectOptions", "Selection",
        "apply_selection", "lora_config", "KappaTuneCallback", "load_causal_lm", "run_bench",
        "run_probe", "ProbeSettings", "ProbeReport",
    } <= lazy  # fmt: skip
    for name in sorted(lazy):
        value = getattr(kappatune, name)
        assert value.__name__ == name
        assert value.__module__ == kappatune._LAZY[name]
    assert kappatune.KappaTuneError.__module__ == "kappatune.errors"


def test_import_kappatune_loads_no_torch() -> None:
    code = "import sys, kappatune; print('torch' in sys.modules, len(kappatune.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import kappatune

    assert out.stdout.split() == ["False", str(len(kappatune.__all__))]


def test_readme_and_examples_import_only_the_public_api() -> None:
    import ast
    import re

    root = Path(__file__).resolve().parents[2]
    deep = []
    for path in sorted((root / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kappatune."):
                deep.append(f"{path.name}: {node.module}")
    readme = (root / "README.md").read_text(encoding="utf-8")
    deep += [
        f"README.md: {m}" for m in re.findall(r"^\s*from (kappatune\.\S+) import", readme, re.M)
    ]
    assert deep == []
