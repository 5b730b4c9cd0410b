"""``kappatune train``'s output flags: the saved dtype and ``--push-to-hub``.

What they do lives in :mod:`kappatune.training.publish`; here are the flags, their checks
and the upload's line of output."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from kappatune.errors import KappaTuneError
from kappatune.training.publish import SAVE_DTYPES

if TYPE_CHECKING:
    from rich.console import Console


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
    """--push-to-hub's checks (--save-dtype's are RunSettings')."""
    from kappatune.training.publish import check_repo_id

    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    elif args.hub_private:
        raise KappaTuneError("--hub-private needs --push-to-hub REPO_ID")


def push(target: Path, args: argparse.Namespace, console: Console) -> None:
    if args.push_to_hub is None:
        return
    from kappatune.training.publish import push_folder

    url = push_folder(target, args.push_to_hub, private=args.hub_private)
    console.print(f"pushed {target.name}/ to {url}")
