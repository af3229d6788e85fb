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


@pytest.fixture(scope="session")
def make_trl_trainer(tmp_path_factory):
    """Build TRL's RewardTrainer (the test-only oracle) around a model, offline, on the CPU, fp32."""
    from trl import RewardConfig, RewardTrainer

    def make(model, tokenizer, rows):
        args = RewardConfig(
            output_dir=str(tmp_path_factory.mktemp("trl")), report_to="none", max_length=None, use_cpu=True, bf16=False
        )
        return RewardTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)

    return make
