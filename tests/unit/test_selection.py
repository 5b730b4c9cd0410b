from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from kappatune.analysis import names
from kappatune.analysis.spectra import Analysis, SkippedRow, SpectrumRow
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget, SelectOptions, parse_quota
from kappatune.selection.core import Selection, select
from kappatune.selection.policies import PolicyContext, get_policy, policy_names, register_policy

NAN = math.nan
INF = math.inf


def row(name: str, kappa: float, numel: int, expert: int | None = None) -> SpectrumRow:
    return SpectrumRow(
        name=name,
        shape=(numel, 1),
        dtype="float32",
        numel=numel,
        expert=expert,
        kappa=kappa,
        sigma_max=1.0,
        sigma_min=1.0 / kappa if kappa else 0.0,
        log_volume=0.0,
        entropy_deficit=0.0,
        stable_rank=1.0,
        effective_rank=1.0,
        layer=names.layer_index(name),
        module_type=names.module_type(name),
        method="test",
    )


L0, L1 = "model.layers.0.", "model.layers.1."
ROWS = (
    row("model.embed_tokens.weight", 20, 500),
    row(L0 + "self_attn.q_proj.weight", 50, 100),
    row(L0 + "self_attn.v_proj.weight", 3, 40),
    row(L0 + "mlp.up_proj.weight", 10, 200),
    row(L0 + "mlp.down_proj.weight", NAN, 10),
    row(L1 + "self_attn.q_proj.weight", 50, 100),
    row(L1 + "self_attn.v_proj.weight", 4, 40),
    row(L1 + "mlp.up_proj.weight", INF, 200),
    row(L1 + "mlp.experts.down_proj", 7, 30, expert=1),
    row(L1 + "mlp.experts.down_proj", 7, 30, expert=0),
)


def short(r: SpectrumRow | object) -> str:
    name = getattr(r, "name")  # noqa: B009
    expert = getattr(r, "expert")  # noqa: B009
    layer = names.layer_index(name)
    tag = f"{names.module_type(name)}{'' if layer is None else layer}"
    return tag if expert is None else f"{tag}[{expert}]"


def order(policy: str, rows=ROWS, **ctx) -> list[str]:
    return [short(r) for r in get_policy(policy)(rows, PolicyContext(**ctx))]


def test_policy_registry() -> None:
    assert policy_names() == (
        "all",
        "fisher",
        "highest-kappa",
        "interference",
        "last-layers",
        "lowest-kappa",
        "random",
        "self-fisher",
        "snr",
    )
    with pytest.raises(
        KappaTuneError, match=r"unknown selection policy 'nope' \(known: all, fisher"
    ):
        get_policy("nope")


def test_lowest_kappa_order_with_ties_inf_and_nan() -> None:
    assert order("lowest-kappa") == [
        "v_proj0",
        "v_proj1",
        "down_proj1[0]",
        "down_proj1[1]",
        "up_proj0",
        "embed_tokens",
        "q_proj0",
        "q_proj1",
        "up_proj1",
        "down_proj0",
    ]
    assert order("lowest-kappa", rows=ROWS[::-1]) == order("lowest-kappa")


def test_highest_kappa_order() -> None:
    assert order("highest-kappa") == [
        "up_proj1",
        "q_proj0",
        "q_proj1",
        "embed_tokens",
        "up_proj0",
        "down_proj1[0]",
        "down_proj1[1]",
        "v_proj1",
        "v_proj0",
        "down_proj0",
    ]


def test_random_is_seeded_and_input_order_free() -> None:
    a = order("random", seed=1)
    assert a == order("random", rows=ROWS[::-1], seed=1)
    assert a != order("random", seed=2)
    assert sorted(a) == sorted(order("all"))
    expected = sorted(ROWS, key=lambda r: r.key)
    random.Random(1).shuffle(expected)
    assert a == [short(r) for r in expected]


def test_all_keeps_checkpoint_order() -> None:
    assert order("all") == [short(r) for r in ROWS]


def test_last_layers() -> None:
    assert order("last-layers", last_layers=1) == [
        "v_proj1",
        "down_proj1[0]",
        "down_proj1[1]",
        "q_proj1",
        "up_proj1",
    ]
    assert order("last-layers", last_layers=2)[5:] == [
        "v_proj0",
        "up_proj0",
        "q_proj0",
        "down_proj0",
    ]
    with pytest.raises(KappaTuneError, match="--last-layers 3 exceeds the 2 layers"):
        order("last-layers", last_layers=3)
    with pytest.raises(KappaTuneError, match="needs --last-layers"):
        order("last-layers")


def test_fisher_orders_by_score_then_kappa() -> None:
    scores = {r.key: float(i % 3) for i, r in enumerate(ROWS)}
    assert order("fisher", scores=scores) == [
        "v_proj1",
        "down_proj1[0]",
        "up_proj0",
        "embed_tokens",  # score 0: kappa 4, 7, 10, 20
        "q_proj0",
        "up_proj1",
        "down_proj0",  # score 1: kappa 50, inf, nan
        "v_proj0",
        "down_proj1[1]",
        "q_proj1",  # score 2: kappa 3, 7, 50
    ]
    partial = dict(list(scores.items())[:4])
    with pytest.raises(
        KappaTuneError,
        match=r"6 of 10 candidates have no Fisher score \(e.g\. model.layers.0.mlp.down_proj",
    ):
        order("fisher", scores=partial)
    with pytest.raises(KappaTuneError, match="needs Fisher scores"):
        order("fisher")


def test_register_a_new_policy() -> None:
    @register_policy("test-by-size")
    def by_size(rows, ctx):  # type: ignore[no-untyped-def]
        return sorted(rows, key=lambda r: (r.numel, r.name, r.key[1]))

    sel = select(ROWS, "test-by-size", Budget(tensors=2))
    assert [short(e) for e in sel.entries] == ["down_proj0", "down_proj1[0]"]
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lowest-kappa")(by_size)


def test_tensor_and_fraction_budgets() -> None:
    sel = select(ROWS, "lowest-kappa", Budget(tensors=3))
    assert [short(e) for e in sel.entries] == ["v_proj0", "v_proj1", "down_proj1[0]"]
    assert sel.entry_count == 3 and sel.tensor_count == 3 and sel.param_count == 110
    assert sel.names == (
        L0 + "self_attn.v_proj.weight",
        L1 + "self_attn.v_proj.weight",
        L1 + "mlp.experts.down_proj",
    )
    assert select(ROWS, "lowest-kappa", Budget(fraction=0.25)).entry_count == 2  # int(9 * 0.25)
    assert select(ROWS, "lowest-kappa", Budget(fraction=0.01)).entry_count == 1  # at least one
    # the NaN-kappa row is no candidate of a kappa policy: 9 of the 10 rows are
    with pytest.raises(KappaTuneError, match="budget of 10 tensors exceeds the 9 candidates"):
        select(ROWS, "lowest-kappa", Budget(tensors=10))
    assert select(ROWS, "random", Budget(tensors=10)).entry_count == 10


def test_parameter_budget_is_a_prefix_of_the_order_with_shortfall() -> None:
    # lowest-kappa order: v_proj0 40, v_proj1 40, down_proj1[0] 30, down_proj1[1] 30, up_proj0 200, ...
    exact = select(ROWS, "lowest-kappa", Budget(params=110))
    assert [short(e) for e in exact.entries] == ["v_proj0", "v_proj1", "down_proj1[0]"]
    assert exact.param_count == 110 and exact.shortfall == 0 and exact.is_prefix
    short_sel = select(ROWS, "lowest-kappa", Budget(params=100))
    # 40 + 40 fit, the next (a 30-element expert) does not: stop there, the later 10 is not taken
    assert [short(e) for e in short_sel.entries] == ["v_proj0", "v_proj1"]
    assert short_sel.param_count == 80 and short_sel.shortfall == 20 and short_sel.is_prefix
    assert "20 short of the 100-parameter budget" in short_sel.describe()
    assert short_sel.describe_order() == (
        "a prefix of the lowest-kappa order: its first 2 candidates"
    )
    pct = select(ROWS, "lowest-kappa", Budget(params_percent=20))  # 20% of 1250 = 250
    assert pct.budget_params == 250 and pct.param_count == 140 and pct.shortfall == 110
    assert [short(e) for e in pct.entries] == [
        "v_proj0",
        "v_proj1",
        "down_proj1[0]",
        "down_proj1[1]",
    ]
    with pytest.raises(
        KappaTuneError,
        match="parameter budget 1,241 exceeds the 1,240 parameters of the 9 candidates",
    ):
        select(ROWS, "lowest-kappa", Budget(params=1241))  # the NaN-kappa row is no candidate
    with pytest.raises(
        KappaTuneError,
        match=r"smaller than the first candidate in order, model.layers.0.self_attn.v_proj.weight"
        r" \(40 parameters\); --fill greedy",
    ):
        select(ROWS, "lowest-kappa", Budget(params=39))


def test_greedy_fill_is_opt_in_and_says_it_is_not_a_prefix() -> None:
    greedy = SelectOptions(fill="greedy")
    sel = select(ROWS, "lowest-kappa", Budget(params=240), greedy)
    # 40 + 40 + 30 + 30, then skips up_proj0 (200) and the embedding (500) and takes q_proj0 (100)
    # (the 10-element down_proj0 has a NaN kappa: no candidate of a kappa policy)
    assert [short(e) for e in sel.entries] == [
        "v_proj0",
        "v_proj1",
        "down_proj1[0]",
        "down_proj1[1]",
        "q_proj0",
    ]
    assert sel.param_count == 240 and sel.shortfall == 0
    assert sel.skipped_in_order == 2 and not sel.is_prefix
    assert sel.describe_order() == (
        "NOT a prefix of the lowest-kappa order: 2 earlier candidate(s) left out (greedy filling)"
    )
    pct = select(ROWS, "lowest-kappa", Budget(params_percent=20), greedy)  # 250
    assert [short(e) for e in pct.entries] == [short(e) for e in sel.entries]
    assert pct.param_count == 240 and pct.shortfall == 10 and pct.skipped_in_order == 2
    assert Selection.from_json(json.loads(json.dumps(sel.to_json()))) == sel
    assert sel.to_json()["options"]["fill"] == "greedy" and sel.to_json()["is_prefix"] is False
    with pytest.raises(
        KappaTuneError, match=r"smaller than the smallest candidate \(30 parameters\)"
    ):
        select(ROWS, "lowest-kappa", Budget(params=9), greedy)
    with pytest.raises(KappaTuneError, match=r"unknown fill mode 'best' \(known: prefix, greedy\)"):
        SelectOptions(fill="best")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("highest-kappa", ["up_proj1", "q_proj0"]),  # 300; q_proj1 would make 400
        ("random", ["up_proj1", "q_proj1", "down_proj0"]),  # seed 0: 310; down_proj1[0] makes 340
        ("all", []),  # the embedding (500) comes first and does not fit
    ],
)
def test_every_policy_takes_a_prefix_of_its_own_order(policy: str, expected: list[str]) -> None:
    budget = Budget(params=310)
    if not expected:
        with pytest.raises(KappaTuneError, match="smaller than the first candidate in order"):
            select(ROWS, policy, budget)
        return
    sel = select(ROWS, policy, budget)
    assert [short(e) for e in sel.entries] == expected and sel.is_prefix
    assert [short(e) for e in sel.entries] == order(policy)[: len(expected)]


def test_quotas_and_thresholds_on_other_orders_are_not_prefixes() -> None:
    quota = select(ROWS, "lowest-kappa", None, SelectOptions(quotas=(("q_proj", 1),)))
    assert [short(e) for e in quota.entries] == ["q_proj0"] and quota.skipped_in_order == 6
    assert quota.describe_order().endswith("(per-type quotas)")
    high = select(ROWS, "highest-kappa", Budget(kappa_max=10))
    assert not high.is_prefix and high.describe_order().endswith(
        "(kappa threshold on another order)"
    )
    assert select(ROWS, "lowest-kappa", Budget(kappa_max=10)).is_prefix


def test_percent_budget_uses_whole_model() -> None:
    analysis = Analysis("m", "fp", ROWS, skipped=(SkippedRow("model.norm.weight", (750,), "1-D"),))
    sel = select(analysis, "lowest-kappa", Budget(params_percent=4))  # 4% of 2000 = 80
    assert sel.total_params == 2000 and sel.budget_params == 80
    assert [short(e) for e in sel.entries] == ["v_proj0", "v_proj1"] and sel.shortfall == 0
    assert sel.source == "m" and sel.fingerprint == "fp"
    assert (
        select(ROWS, "lowest-kappa", Budget(params_percent=4), total_params=1000).budget_params
        == 40
    )


def test_kappa_threshold() -> None:
    sel = select(ROWS, "lowest-kappa", Budget(kappa_max=10))
    assert [short(e) for e in sel.entries] == [
        "v_proj0",
        "v_proj1",
        "down_proj1[0]",
        "down_proj1[1]",
        "up_proj0",
    ]
    with pytest.raises(KappaTuneError, match=r"no candidate has kappa <= 2 \(lowest of 9 is 3\)"):
        select(ROWS, "lowest-kappa", Budget(kappa_max=2))


def test_filters_and_quotas() -> None:
    opts = SelectOptions(include=r"self_attn", exclude=r"layers\.1\.")
    assert [short(e) for e in select(ROWS, "lowest-kappa", None, opts).entries] == [
        "v_proj0",
        "q_proj0",
    ]
    opts = SelectOptions(module_types=("q_proj", "up_proj"))
    sel = select(ROWS, "highest-kappa", Budget(tensors=2), opts)
    assert [short(e) for e in sel.entries] == ["up_proj1", "q_proj0"] and sel.candidates == 4
    quota = SelectOptions(quotas=(("v_proj", 1), ("q_proj", 2), ("down_proj", 1)))
    assert [short(e) for e in select(ROWS, "lowest-kappa", None, quota).entries] == [
        "v_proj0",
        "down_proj1[0]",
        "q_proj0",
        "q_proj1",
    ]
    with pytest.raises(KappaTuneError, match="quota v_proj=3 exceeds the 2 v_proj candidates"):
        select(ROWS, "lowest-kappa", None, SelectOptions(quotas=(("v_proj", 3),)))
    with pytest.raises(KappaTuneError, match=r"quota o_proj=1: no o_proj candidates"):
        select(ROWS, "lowest-kappa", None, SelectOptions(quotas=(("o_proj", 1),)))
    with pytest.raises(
        KappaTuneError, match=r"unknown module type\(s\) o_proj \(the model has: down_proj"
    ):
        select(ROWS, "lowest-kappa", None, SelectOptions(module_types=("o_proj",)))
    with pytest.raises(KappaTuneError, match="leave 0 of 10 candidates"):
        select(ROWS, "lowest-kappa", None, SelectOptions(include="nothing-matches"))
    assert parse_quota("v_proj=4") == ("v_proj", 4)
    with pytest.raises(KappaTuneError, match="expected TYPE=N"):
        parse_quota("v_proj")


def test_budget_validation_and_parsing() -> None:
    with pytest.raises(KappaTuneError, match=r"exactly one kind.*got 2: tensors, fraction"):
        Budget(tensors=1, fraction=0.5)
    with pytest.raises(KappaTuneError, match="got 0: none"):
        Budget()
    for bad, msg in [
        ({"tensors": 0}, "at least 1"),
        ({"fraction": 1.5}, r"\(0, 1\]"),
        ({"params_percent": 0.0}, r"\(0, 100\]"),
        ({"kappa_max": 0.5}, ">= 1"),
    ]:
        with pytest.raises(KappaTuneError, match=msg):
            Budget(**bad)  # type: ignore[arg-type]
    assert Budget.parse_params("10%") == Budget(params_percent=10.0)
    assert Budget.parse_params("2.5M") == Budget(params=2_500_000)
    assert Budget.parse_params("300k") == Budget(params=300_000)
    assert Budget.parse_params("1,000") == Budget(params=1000)
    with pytest.raises(KappaTuneError, match="cannot read parameter budget 'lots'"):
        Budget.parse_params("lots")
    with pytest.raises(KappaTuneError, match="not a whole number"):
        Budget.parse_params("1.5")


def test_selection_json_round_trip(tmp_path: Path) -> None:
    rows = [r for r in ROWS if not math.isnan(r.kappa)]
    opts = SelectOptions(include="layers", quotas=(("up_proj", 2), ("down_proj", 2)), seed=5)
    sel = select(rows, "highest-kappa", Budget(params=460), opts, source="src", fingerprint="abc")
    assert [short(e) for e in sel.entries] == [
        "up_proj1",
        "up_proj0",
        "down_proj1[0]",
        "down_proj1[1]",
    ]
    assert sel.experts() == {
        L1 + "mlp.up_proj.weight": None,
        L0 + "mlp.up_proj.weight": None,
        L1 + "mlp.experts.down_proj": (0, 1),
    }
    text = json.dumps(sel.to_json(), allow_nan=False)
    assert '"kappa": "inf"' in text
    again = Selection.from_json(json.loads(text))
    assert again == sel
    sel.save(tmp_path / "s.json")
    assert Selection.load(tmp_path / "s.json") == sel
    bad = sel.to_json() | {"schema_version": 99}
    with pytest.raises(KappaTuneError, match="unsupported selection schema_version 99"):
        Selection.from_json(bad)
    with pytest.raises(KappaTuneError, match="malformed selection JSON"):
        Selection.from_json({"schema_version": 1, "entries": []})
    with pytest.raises(KappaTuneError, match="no such selection file"):
        Selection.load(tmp_path / "missing.json")


def test_selection_rejects_empty_and_duplicates() -> None:
    sel = select(ROWS, "lowest-kappa", Budget(tensors=1))
    with pytest.raises(KappaTuneError, match="empty selection"):
        Selection((), "p", None, "", "", 0, 0, 0)
    with pytest.raises(KappaTuneError, match="twice"):
        Selection(sel.entries * 2, "p", None, "", "", 1, 1, 1)
