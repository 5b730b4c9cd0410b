"""Peer arms (OSF, MiCA, PiSSA, CorDA-KPM, Spectrum, MLP-only LoRA) on a tiny Llama."""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kappatune.analysis.spectra import analyze
from kappatune.bench import arms, peers
from kappatune.bench import run as run_mod
from kappatune.bench.arms import ArmContext, candidate_rows, get_arm, prepare_arm
from kappatune.bench.run import BenchSettings, run_bench
from kappatune.bench.scenarios import Scenario
from kappatune.bench.tokenized import EvalSizes, prepare
from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.training.data import TokenizedData
from tests.unit._tiny_models import char_tokenizer, tiny_llama, toy_scenario

BUDGET = 4096
# tiny Llama: q 32x32, k 16x32, v 16x32, o 32x32, gate 64x32, up 64x32, down 32x64; 2 layers
MODULES = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]
MLP = [m for m in MODULES if ".mlp." in m]


def _names(modules: list[str], parts: tuple[str, ...]) -> set[str]:
    return {f"base_model.model.{m}.{p}" for m in modules for p in parts}


LORA = ("lora_A.default.weight", "lora_B.default.weight")
# (trainable names, count): the count by hand from the shapes above
EXPECTED = {
    # per unit of trainable rank: out + in + 1 = 519 per layer, 1038 in all -> k = 3
    "osf": (
        _names(MODULES, tuple(f"osf_svd_params.default.{x}" for x in ("U_low", "S_low", "V_low"))),
        3 * 1038,
    ),
    # MiCA trains A only: r * in = r * 256 per layer -> r = 8
    "mica": (_names(MODULES, ("lora_A.default.weight",)), 8 * 512),
    # r (in + out) = 512 per layer per rank -> r = 4
    "pissa": (_names(MODULES, LORA), 4 * 1024),
    "corda-kpm": (_names(MODULES, LORA), 4 * 1024),
    # gate/up/down: 96 each per rank, 576 in all -> r = 7
    "mlp-lora": (_names(MLP, LORA), 7 * 576),
}


@pytest.fixture(scope="module")
def model_and_rows() -> tuple[torch.nn.Module, list]:
    model = tiny_llama(seed=0)
    return model, candidate_rows(analyze(model).tensors, model)


def _ctx(rows: list) -> ArmContext:
    return ArmContext(rows=tuple(rows), budget=Budget(params=BUDGET), total_params=10**6, seed=0)


def _keep() -> TokenizedData:
    ids = torch.randint(4, 100, (6, 16), generator=torch.Generator().manual_seed(0))
    return TokenizedData(ids, torch.ones_like(ids), ids.clone())


@pytest.mark.parametrize("arm", sorted(EXPECTED))
def test_peer_trains_exactly_its_set_within_the_budget(model_and_rows: tuple, arm: str) -> None:
    model, rows = model_and_rows
    ready = prepare_arm(copy.deepcopy(model), get_arm(arm), _ctx(rows), keep=_keep())
    trained = {n: p.numel() for n, p in ready.model.named_parameters() if p.requires_grad}
    names, count = EXPECTED[arm]
    assert set(trained) == names
    assert ready.trainable_params == sum(trained.values()) == count <= BUDGET


def _spectrum_scores(model: torch.nn.Module) -> dict[str, float]:
    """Spectrum's calculate_snr_for_layer (commit 0ed1756), transcribed with torch."""
    out = {}
    for name in MODULES:
        w = model.get_submodule(name).weight.detach().double()
        s = torch.linalg.svdvals(w)
        sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
        n, m = w.shape[-2:]
        beta = n / m if n < m else m / n
        edge = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
        mask = s > edge
        signal = s[mask].sum() if mask.any() else torch.tensor(0.0)
        noise = s[~mask].sum() if (~mask).any() else torch.tensor(1.0)
        out[name + ".weight"] = float((signal / noise) / s[0])
    return out


def test_spectrum_trains_the_highest_snr_per_type_fully(model_and_rows: tuple) -> None:
    model, rows = model_and_rows
    scores = _spectrum_scores(model)
    assert {r.name: r.snr for r in rows} == pytest.approx(scores, rel=1e-6)
    # the interleaved order: rank within the type / type size, then SNR; a prefix under the budget
    by_type: dict[str, list[str]] = {}
    for name in sorted(scores, key=lambda n: (-scores[n], n)):
        by_type.setdefault(name.rsplit(".", 2)[-2], []).append(name)
    order = sorted(
        ((k + 1) / len(g), -scores[n], n) for g in by_type.values() for k, n in enumerate(g)
    )
    numel = {r.name: r.numel for r in rows}
    chosen, used = set(), 0
    for _, _, n in order:
        if used + numel[n] > BUDGET:
            break
        chosen.add(n)
        used += numel[n]
    ready = prepare_arm(copy.deepcopy(model), get_arm("spectrum"), _ctx(rows))
    trained = {n for n, p in ready.model.named_parameters() if p.requires_grad}
    assert trained == chosen and ready.trainable_params == used


def test_missing_peft_version_names_the_one_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.19.1")
    with pytest.raises(
        KappaTuneError,
        match=r"^arm 'mica' needs PEFT >= 0\.20\.0 \(installed: 0\.19\.1\): pip install -U 'peft>=0\.20\.0'$",
    ):
        peers.require_peft("mica")
    peers.require_peft("osf")  # 0.18.0 is enough


def test_corda_without_attrs_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "attr" else real(name)
    )
    with pytest.raises(KappaTuneError, match=r"imports 'attr', which is not installed"):
        peers.require_peft("corda-kpm")


def test_corda_without_data_to_keep(model_and_rows: tuple) -> None:
    model, rows = model_and_rows
    with pytest.raises(
        KappaTuneError, match="uses data of what to keep, and the scenario has none"
    ):
        prepare_arm(copy.deepcopy(model), get_arm("corda-kpm"), _ctx(rows), keep=None)


def test_tables_mark_the_arm_that_uses_data_of_what_to_keep() -> None:
    assert arms.arm_label("corda-kpm") == "corda-kpm (uses data of what to keep)"
    assert [arms.arm_label(a) for a in ("osf", "spectrum", "base")] == ["osf", "spectrum", "base"]


# --------------------------------------------------------------------------- through the runner


@pytest.fixture(scope="module")
def setup(toy_bench: dict[str, Path]) -> tuple[Path, Scenario, Path]:
    return toy_bench["model"], toy_scenario(toy_bench), toy_bench["train"].parent


SIZES = EvalSizes(seq_len=16, task_sequences=3, control_sequences=10, control_seq_len=16)


def test_keep_data_never_holds_the_control_evaluation_rows(setup: tuple) -> None:
    _, scenario, _ = setup
    p = prepare(scenario, scenario.load(), char_tokenizer(), SIZES)
    assert p.keep is not None and len(p.keep) > 0
    keep = {
        tuple(int(t) for t in row[: int(m.sum())])
        for row, m in zip(p.keep.input_ids, p.keep.attention_mask, strict=True)
    }
    evaluated = {s.ids for s in p.control}
    assert len(evaluated) == 10 and not keep & evaluated


def test_tiny_bench_with_every_peer(
    setup: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, scenario, _ = setup
    seen: list[TokenizedData] = []
    real = peers._run_on

    def spy(m: torch.nn.Module, keep: TokenizedData) -> None:
        seen.append(keep)
        real(m, keep)

    monkeypatch.setattr(peers, "_run_on", spy)
    settings = BenchSettings(
        model=str(model),
        arms=arms.PEER_ARMS,
        seeds=(0,),
        steps=1,
        checkpoints=1,
        lr_count=1,
        knowledge="none",
        budget="3072",
        batch_size=2,
        sizes=SIZES,
    )
    outcome = run_bench([scenario], settings, tmp_path)
    got = {r.arm: r.trainable_params for r in outcome.runs}
    # ranks fitted to 3072: osf 2 x 1038, mica 6 x 512, pissa/corda 3 x 1024, mlp 5 x 576
    assert {k: v for k, v in got.items() if k != "spectrum"} == {
        "osf": 2076,
        "mica": 3072,
        "pissa": 3072,
        "corda-kpm": 3072,
        "mlp-lora": 2880,
    }
    assert 3072 - 512 < got["spectrum"] <= 3072
    assert any("osf: trainable rank 2 on 14 modules" in n for n in outcome.notes)
    control_eval = {
        s.ids for s in prepare(scenario, scenario.load(), char_tokenizer(), SIZES).control
    }
    assert len(seen) == 1
    fed = {
        tuple(int(t) for t in row[: int(m.sum())])
        for row, m in zip(seen[0].input_ids, seen[0].attention_mask, strict=True)
    }
    assert fed and not fed & control_eval


def test_bench_corda_without_data_to_keep_exits_2(
    setup: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _, root = setup
    code = main(
        ["bench", "--model", str(model), "--arms", "corda-kpm", "--seeds", "0", "--steps", "1",
         "--checkpoints", "1", "--knowledge", "none", "--seq-len", "16", "--budget-params", "3072", "--task-sequences", "3",
         "--control-sequences", "4", "--control-seq-len", "16", "--train", str(root / "train.txt"), "--heldout",
         str(root / "held.txt"), "--control", str(root / "short.txt"), "--output", str(tmp_path)]
    )  # fmt: skip
    err = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert code == 2 and len(err) == 1  # one line (the rest of stderr is progress)
    assert err[0].startswith("kappatune: error: arm 'corda-kpm' uses data of what to keep")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("corda*"))


def test_run_key_of_other_arms_is_unchanged_by_keep_data() -> None:
    settings = BenchSettings(model="m", arms=("kappa", "corda-kpm"))
    kappa = settings.arm("kappa")
    corda = settings.arm("corda-kpm")
    assert run_mod.run_key("b", kappa, 1e-4, 0, settings, "k1") == run_mod.run_key(
        "b", kappa, 1e-4, 0, settings, "k2"
    )
    assert run_mod.run_key("b", corda, 1e-4, 0, settings, "k1") != run_mod.run_key(
        "b", corda, 1e-4, 0, settings, "k2"
    )


def test_a_text_shorter_than_the_sizes_asked_is_said(
    setup: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """The evaluation uses what the text holds, and says so, instead of quietly fewer rows."""
    _, scenario, _ = setup
    data = scenario.load()
    caplog.set_level("WARNING", logger="kappatune.bench.tokenized")
    p = prepare(scenario, data, char_tokenizer(), SIZES)
    assert caplog.messages == []  # the sizes fit: nothing to say
    asked = EvalSizes(seq_len=16, task_sequences=3, control_sequences=100_000, control_seq_len=16)
    p = prepare(scenario, data, char_tokenizer(), asked)
    n = len(p.control)
    assert 10 < n < 100_000
    assert caplog.messages == [
        f"control: {data.control.origin} has {n} control rows, fewer than the 100000 asked"
        f" for; evaluating on {n}"
    ]


def _corda(model: torch.nn.Module, rows: list, cache: peers.PreprocessCache) -> dict:
    ready = prepare_arm(
        copy.deepcopy(model), get_arm("corda-kpm"), _ctx(rows), keep=_keep(), peer_cache=cache
    )
    return {n: p.detach().clone() for n, p in ready.model.named_parameters()}


def test_corda_preprocessing_is_computed_once_and_reused(
    model_and_rows: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, rows = model_and_rows
    calls: list[int] = []
    real = peers._run_on
    monkeypatch.setattr(peers, "_run_on", lambda m, k: calls.append(1) or real(m, k))
    cache = peers.PreprocessCache(tmp_path / "cache", "tag")
    first = _corda(model, rows, cache)
    assert calls == [1]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        cache.file(peers.plan(model, "corda-kpm", BUDGET)).name
    ]  # no temporary file left behind
    second = _corda(model, rows, cache)
    assert calls == [1]  # read from the cache, no forward pass over the data to keep
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    # another tag (another model or data to keep) is another file
    _corda(model, rows, peers.PreprocessCache(tmp_path / "cache", "other"))
    assert calls == [1, 1] and len(list((tmp_path / "cache").iterdir())) == 2


def test_corda_unreadable_cache_is_recomputed(
    model_and_rows: tuple, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, rows = model_and_rows
    cache = peers.PreprocessCache(tmp_path, "tag")
    want = _corda(model, rows, peers.PreprocessCache(tmp_path / "clean", "tag"))
    path = cache.file(peers.plan(model, "corda-kpm", BUDGET))
    path.write_bytes(b"not a torch file")
    got = _corda(model, rows, cache)
    assert "unusable CorDA cache" in caplog.text
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert path.read_bytes() != b"not a torch file"  # replaced by a good one
