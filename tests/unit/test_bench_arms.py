import pytest
import torch

from kappatune.analysis.spectra import analyze
from kappatune.bench import arms
from kappatune.bench.arms import ArmContext, arm_selection, candidate_rows, get_arm, prepare_arm
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from tests.unit._tiny_models import tiny_llama

BUDGET = 4096


@pytest.fixture(scope="module")
def model_and_rows() -> tuple[torch.nn.Module, list]:
    model = tiny_llama(seed=0)
    rows = candidate_rows(analyze(model).tensors, model)
    return model, rows


def _ctx(rows: list, seed: int = 0, budget: int = BUDGET) -> ArmContext:
    return ArmContext(rows=tuple(rows), budget=Budget(params=budget), total_params=10**6, seed=seed)


L = "model.layers."
# lowest kappa first: 1.v (512), 0.k (512), 1.k (512), 1.down (2048), then 0.up (2048) overshoots
LOWEST_PREFIX = {
    L + "1.self_attn.v_proj",
    L + "0.self_attn.k_proj",
    L + "1.self_attn.k_proj",
    L + "1.mlp.down_proj",
}
# highest kappa first: 1.o, 0.q, 1.q, 0.o (1024 each) fill the budget exactly
HIGHEST_PREFIX = {
    L + "1.self_attn.o_proj",
    L + "0.self_attn.q_proj",
    L + "1.self_attn.q_proj",
    L + "0.self_attn.o_proj",
}


def test_candidates_are_the_linear_layers_without_the_head(model_and_rows: tuple) -> None:
    _model, rows = model_and_rows
    names = {r.name for r in rows}
    assert len(rows) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" not in names
    assert "model.layers.1.mlp.down_proj.weight" in names


@pytest.mark.parametrize(
    ("arm", "expected", "params"),
    [("kappa", LOWEST_PREFIX, 3 * 512 + 2048), ("highest", HIGHEST_PREFIX, 4 * 1024)],
)
def test_selective_arms_train_a_prefix_of_their_kappa_order(
    model_and_rows: tuple, arm: str, expected: set[str], params: int
) -> None:
    import copy

    model, rows = model_and_rows
    ready = prepare_arm(copy.deepcopy(model), get_arm(arm), _ctx(rows))
    trained = {n for n, p in ready.model.named_parameters() if p.requires_grad}
    assert trained == {f"{m}.weight" for m in expected}
    assert ready.trainable_params == params


def test_all_arms_share_one_budget(model_and_rows: tuple) -> None:
    import copy

    model, rows = model_and_rows
    counts = {}
    for name in ("kappa", "random", "highest", "lora", "kappa-lora"):
        ready = prepare_arm(copy.deepcopy(model), get_arm(name), _ctx(rows))
        counts[name] = ready.trainable_params
        assert ready.trainable_params <= BUDGET, name
    # LoRA on all 14 linear layers costs 2 * (32 + 32) * 4 + ... per rank; the chosen rank is the
    # largest that fits, so one more rank would overshoot
    per_rank_all = sum(
        m.in_features + m.out_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )
    assert counts["lora"] == (BUDGET // per_rank_all) * per_rank_all
    assert counts["lora"] + per_rank_all > BUDGET
    # each selective arm trains a prefix of its own order: up to one matrix (2048) short
    for name in ("kappa", "random", "highest"):
        assert counts[name] > BUDGET - 2048


def test_random_arm_depends_on_seed_only(model_and_rows: tuple) -> None:
    _, rows = model_and_rows
    arm = get_arm("random")
    a = arm_selection(arm, _ctx(rows, seed=0))
    b = arm_selection(arm, _ctx(rows, seed=0))
    assert a is not None and b is not None and a.names == b.names
    others = {arm_selection(arm, _ctx(rows, seed=s)).names for s in range(1, 6)}  # type: ignore[union-attr]
    assert len(others | {a.names}) > 1


def test_kappa_lora_adapts_the_lowest_kappa_fraction(model_and_rows: tuple) -> None:
    import copy

    model, rows = model_and_rows
    ready = prepare_arm(copy.deepcopy(model), get_arm("kappa-lora"), _ctx(rows))
    lowest = sorted(rows, key=lambda r: (r.kappa, r.name))[: int(14 * 0.2)]
    assert ready.lora_targets["target_modules"] == [r.name.removesuffix(".weight") for r in lowest]


def test_budgets_the_model_cannot_meet() -> None:
    model = tiny_llama(seed=0)
    rows = candidate_rows(analyze(model).tensors, model)
    with pytest.raises(KappaTuneError, match="exceeds the"):
        arm_selection(get_arm("kappa"), _ctx(rows, budget=10**9))
    with pytest.raises(KappaTuneError, match="smaller than the first candidate in order"):
        arm_selection(get_arm("kappa"), _ctx(rows, budget=100))


def test_arm_registry_and_validation() -> None:
    assert set(arms.DEFAULT_ARMS) <= set(arms.arm_names())
    assert "fisher" in arms.arm_names() and get_arm("fisher").needs_fisher
    assert get_arm("full").lr < get_arm("kappa").lr  # full fine-tuning gets its own, smaller lr
    with pytest.raises(KappaTuneError, match="unknown arm 'nope'"):
        get_arm("nope")
    with pytest.raises(KappaTuneError, match="learning rate must be positive"):
        arms.Arm("x", "full", None, 0.0, 0, "")
    with pytest.raises(KappaTuneError, match="needs a policy"):
        arms.Arm("x", "selective", None, 1e-4, 0, "")
    with pytest.raises(KappaTuneError, match="lora-fraction"):
        ArmContext(rows=(), budget=Budget(params=1), total_params=1, seed=0, lora_fraction=0.0)
