"""Shared fixtures: every test starts from the same seed; tiny models come from tests/parity.py."""

import random
import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def seed_everything():
    """Tests build tiny random models; a fixed seed makes every run see the same ones."""
    random.seed(0)
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=FutureWarning)
