"""What ``kappatune train`` does to make its output travel: the saved dtype, the adapter's
portable base-model name, the model card, and ``--push-to-hub``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from kappatune.errors import KappaTuneError

SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_publish_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument(
        "--save-dtype",
        default="auto",
        choices=SAVE_DTYPES,
        help="dtype of the saved model (selective, full); auto keeps the dtype the checkpoint"
        " was stored in (default: auto)",
    )
    g.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="upload model/ or adapter/ to this Hugging Face Hub repository (needs a login)",
    )
    g.add_argument(
        "--hub-private", action="store_true", help="create the --push-to-hub repository private"
    )


def validate_publish(args: argparse.Namespace) -> None:
    from kappatune.training.publish import check_repo_id

    if args.save_dtype != "auto" and args.method in ("lora", "kappa-lora"):
        raise KappaTuneError(
            f"--save-dtype applies to --method selective or full, not {args.method}"
        )
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    elif args.hub_private:
        raise KappaTuneError("--hub-private needs --push-to-hub REPO_ID")


def is_adapter(method: str) -> bool:
    return method in ("lora", "kappa-lora")


def prepare_for_save(model: Any, args: argparse.Namespace) -> None:
    """Name the base model portably (adapters) or cast to the dtype to save (models)."""
    from kappatune.training.models import portable_name

    if is_adapter(args.method):
        for config in model.peft_config.values():
            config.base_model_name_or_path = portable_name(args.model)
        return
    model.to(save_dtype(args))


def save_dtype(args: argparse.Namespace) -> Any:
    """The torch dtype a model is saved in: ``--save-dtype``, or the checkpoint's own."""
    from kappatune.training.models import checkpoint_dtype, parse_dtype

    if args.save_dtype == "auto":
        return checkpoint_dtype(args.model)
    return parse_dtype(args.save_dtype)


def write_model_card(
    target: Path,
    args: argparse.Namespace,
    result: Any,
    prepared: Any,
    selection: Any,
    final_eval: float | None,
) -> None:
    import kappatune
    from kappatune.training.model_card import CardFacts, data_names, selected_tensors, write_card
    from kappatune.training.models import portable_name

    facts = CardFacts(
        base_model=portable_name(args.model),
        method=args.method,
        data=data_names(args.data),
        steps=result.steps,
        final_loss=result.final_loss,
        trainable_params=prepared.trainable_params,
        version=kappatune.__version__,
        adapter=is_adapter(args.method),
        policy=None if selection is None else selection.policy,
        selected=() if selection is None else selected_tensors(selection),
        selected_count=0 if selection is None else selection.entry_count,
        lora_r=prepared.lora_r,
        eval_loss=final_eval,
        tags=("lora",) if is_adapter(args.method) else (),
    )
    write_card(target, facts)


def push(target: Path, args: argparse.Namespace, console: Any) -> None:
    if args.push_to_hub is None:
        return
    from kappatune.training.publish import push_folder

    url = push_folder(target, args.push_to_hub, private=args.hub_private)
    console.print(f"pushed {target.name}/ to {url}")
