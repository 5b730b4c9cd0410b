"""The model card (``README.md`` with Hugging Face metadata) written next to a trained output.

The card says what was trained so the folder explains itself when it travels (copied, pushed
to the hub): the base model's portable name, the method, the selected tensors with their
condition numbers, the data, the steps, the losses and the kappatune version. The YAML
header (``base_model``, ``library_name``, ``tags``) is written by ``huggingface_hub``'s
``ModelCardData``, the form the hub reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.selection.core import Selection, SelectionEntry

if TYPE_CHECKING:
    from kappatune.training.loop import TrainResult
    from kappatune.training.methods import PreparedModel

CARD_NAME = "README.md"
TOP_ENTRIES = 10


SelectedTensor = SelectionEntry  # a selected matrix as the card lists it (name, expert, kappa)


@dataclass(frozen=True)
class CardFacts:
    """What the card states; built from the run (see :func:`card_facts`)."""

    base_model: str
    method: str
    data: tuple[str, ...]
    steps: int
    final_loss: float
    trainable_params: int
    version: str
    adapter: bool
    policy: str | None = None
    selected: tuple[SelectedTensor, ...] = ()
    selected_count: int = 0
    lora_r: int | None = None
    eval_loss: float | None = None
    tags: tuple[str, ...] = field(default=())

    @property
    def library_name(self) -> str:
        return "peft" if self.adapter else "transformers"


def selected_tensors(selection: Selection, top: int = TOP_ENTRIES) -> tuple[SelectedTensor, ...]:
    """The first ``top`` entries of the selection, in its order (the policy's order)."""
    return selection.entries[:top]


def _selection_section(facts: CardFacts) -> list[str]:
    if not facts.selected:
        return []
    shown = len(facts.selected)
    more = facts.selected_count - shown
    lines = [
        "",
        "## Selection",
        "",
        f"{facts.selected_count} matrices chosen by the `{facts.policy}` policy"
        + (f"; the first {shown} in selection order:" if more > 0 else ":"),
        "",
        "| tensor | kappa | parameters |",
        "|---|---:|---:|",
    ]
    for t in facts.selected:
        name = t.name if t.expert is None else f"{t.name} (expert {t.expert})"
        kappa = f"{t.kappa:.4g}" if math.isfinite(t.kappa) else str(t.kappa)
        lines.append(f"| `{name}` | {kappa} | {t.numel:,} |")
    if more > 0:
        lines += ["", f"... and {more} more (see `selection.json` in the run directory)."]
    return lines


def render_card(facts: CardFacts) -> str:
    """The card's text: YAML metadata, then what was trained, in Markdown."""
    from huggingface_hub import ModelCardData

    tags = ["kappatune", facts.method, *facts.tags]
    meta = ModelCardData(
        base_model=facts.base_model,
        library_name=facts.library_name,
        tags=list(dict.fromkeys(tags)),
    )
    kind = "LoRA adapter" if facts.adapter else "model"
    rank = f" (LoRA rank {facts.lora_r})" if facts.lora_r else ""
    lines = [
        "---",
        meta.to_yaml(),
        "---",
        "",
        f"# {facts.method} fine-tune of {facts.base_model}",
        "",
        f"This {kind} was trained with [kappatune](https://pypi.org/project/kappatune/)"
        f" {facts.version}.",
        "",
        f"- base model: `{facts.base_model}`",
        f"- method: `{facts.method}`{rank}",
        f"- trainable parameters: {facts.trainable_params:,}",
        f"- data: {', '.join(f'`{d}`' for d in facts.data)}",
        f"- steps: {facts.steps}",
        f"- final training loss: {facts.final_loss:.4f}",
    ]
    if facts.eval_loss is not None:
        lines.append(f"- final evaluation loss: {facts.eval_loss:.4f}")
    lines += _selection_section(facts)
    lines += ["", "## Use", "", _usage(facts), ""]
    return "\n".join(lines)


def _usage(facts: CardFacts) -> str:
    if facts.adapter:
        code = (
            "from transformers import AutoModelForCausalLM\n"
            "from peft import PeftModel\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{facts.base_model}")\n'
            'model = PeftModel.from_pretrained(base, "PATH_OR_REPO_OF_THIS_ADAPTER")'
        )
    else:
        code = (
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")\n'
            'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO_OF_THIS_MODEL")'
        )
    return f"```python\n{code}\n```"


def write_card(folder: Path, facts: CardFacts) -> Path:
    """Write ``folder/README.md`` atomically (replacing e.g. PEFT's empty template)."""
    target = Path(folder) / CARD_NAME
    tmp = target.with_name(f".{CARD_NAME}.tmp")
    tmp.write_text(render_card(facts), encoding="utf-8")
    os.replace(tmp, target)
    return target


def data_names(specs: Sequence[object]) -> tuple[str, ...]:
    """Data as the card names it: file names (not machine-local paths) or dataset ids."""
    out = []
    for spec in specs:
        text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
        out.append(Path(text).name if Path(text).expanduser().exists() else text)
    return tuple(out)


def write_run_card(
    target: Path,
    *,
    model_spec: str,
    method: str,
    adapter: bool,
    data: Sequence[object],
    result: TrainResult,
    prepared: PreparedModel,
    selection: Selection | None,
    final_eval: float | None,
) -> Path:
    """The card of a ``kappatune train`` output folder ``target``."""
    from kappatune._version import __version__
    from kappatune.training.models import portable_name

    facts = CardFacts(
        base_model=portable_name(model_spec),
        method=method,
        data=data_names(data),
        steps=result.steps,
        final_loss=result.final_loss,
        trainable_params=prepared.trainable_params,
        version=__version__,
        adapter=adapter,
        policy=None if selection is None else selection.policy,
        selected=() if selection is None else selected_tensors(selection),
        selected_count=0 if selection is None else selection.entry_count,
        lora_r=prepared.lora_r,
        eval_loss=final_eval,
        tags=("lora",) if adapter else (),
    )
    return write_card(target, facts)
