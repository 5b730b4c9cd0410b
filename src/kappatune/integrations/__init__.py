"""Bridges to other libraries: PEFT (``lora``) and the Hugging Face Trainer / TRL (``trainer``).

Each submodule imports its library lazily, so importing kappatune never needs them.
"""
