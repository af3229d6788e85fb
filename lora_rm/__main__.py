"""`python -m lora_rm` (and `torchrun -m lora_rm`) runs the CLI."""

from .cli import entry_point

entry_point()
