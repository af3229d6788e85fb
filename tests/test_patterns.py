"""rank_pattern / alpha_pattern and layers_to_transform / layers_pattern: PEFT's rules, equal to PEFT 0.21."""

import contextlib
import dataclasses
import io
import json

import peft
import pytest
import torch
from parity import (
    FP32_TOL,
    FP64_TOL,
    PATTERN_ARCHS,
    PATTERN_CHECKS,
    adapted_ranks,
    layers_config,
    paired_models,
    rank_pattern_config,
    rewards,
    tiny_batch,
    tiny_model,
)
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from lora_rm import LoraConfig, add_lora, load_adapter, save_adapter
from lora_rm.builtin import builtin_model, builtin_tokenizer
from lora_rm.cli import build_parser, main, train_config_from_args
from lora_rm.inject import _is_target, pattern_value
from lora_rm.run_folder import changed_settings


@pytest.mark.parametrize("check_name", list(PATTERN_CHECKS))
@pytest.mark.parametrize("arch", PATTERN_ARCHS)
def test_pattern_parity_with_peft(arch, check_name):
    """Both load directions, one AdamW step and merge, after asserting the same modules got the same ranks."""
    assert PATTERN_CHECKS[check_name](arch, None) <= (FP64_TOL if "fp64" in check_name else FP32_TOL)


@pytest.mark.parametrize("arch", PATTERN_ARCHS)
@pytest.mark.parametrize("make", [rank_pattern_config, layers_config])
def test_pattern_adapters_are_not_vacuous(arch, make):
    ours, theirs = paired_models(arch, make(arch))
    with torch.no_grad():
        assert (rewards(ours, tiny_batch()) - rewards(tiny_model(arch), tiny_batch())).abs().max() > 0.1
    assert adapted_ranks(ours) == adapted_ranks(theirs)


def test_rank_pattern_gives_each_module_its_rank_and_alpha():
    """llama, r=4 alpha=8: v_proj 2, layer 1's v_proj 6 (its key comes first), layer 1's q_proj 8; q_proj alpha 16."""
    ours, _ = paired_models("llama", rank_pattern_config("llama"))
    assert adapted_ranks(ours) == {
        "model.layers.0.self_attn.q_proj": (4, 16 / 4),
        "model.layers.0.self_attn.v_proj": (2, 8 / 2),
        "model.layers.1.self_attn.q_proj": (8, 16 / 8),
        "model.layers.1.self_attn.v_proj": (6, 8 / 6),
    }


def test_layers_to_transform_adapts_only_those_layers():
    ours, _ = paired_models("gpt2", layers_config("gpt2"))
    assert sorted(adapted_ranks(ours)) == ["transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                                            "transformer.h.1.mlp.c_proj"]


NAMES = [
    "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.12.mlp.up_proj",
    "model.layers.1.experts.0.w1", "model.layers.0.experts.1.w1", "transformer.h.1.attn.c_attn",
    "bert.encoder.layer.1.attention.self.query", "bert.pooler.dense", "layers.1.q_proj", "q_proj",
    "model.decoder.layers.0.self_attn.k_proj", "vision.blocks.1.attn.q_proj",
]
MATCH_CONFIGS = [
    dict(target_modules=["q_proj", "up_proj", "w1", "c_attn", "query", "dense", "k_proj"]),
    dict(target_modules=["q_proj", "w1", "c_attn", "query", "dense"], layers_to_transform=1),
    dict(target_modules=["q_proj", "up_proj", "w1", "dense"], layers_to_transform=[0, 12]),
    dict(target_modules=["q_proj", "c_attn", "query"], layers_to_transform=[1], layers_pattern="h"),
    dict(target_modules=["q_proj", "query", "w1"], layers_to_transform=[1], layers_pattern=["layer", "blocks"]),
    dict(target_modules=["q_proj", "w1"], layers_to_transform=[0], layers_pattern="experts"),
    dict(target_modules=["q_proj"], layers_to_transform=[]),  # empty: every layer
    # an exact full name is adapted whatever layers_to_transform says (PEFT checks layers only for suffix matches)
    dict(target_modules=["model.layers.1.self_attn.q_proj", "k_proj"], layers_to_transform=[0]),
    dict(target_modules=r".*\.(q_proj|w1)"),
]


@pytest.mark.parametrize("fields", MATCH_CONFIGS)
def test_target_and_layer_rule_is_peft_check_target_module_exists(fields):
    ours = LoraConfig(**fields)
    theirs = peft.LoraConfig(task_type="SEQ_CLS", **fields)
    assert {n for n in NAMES if _is_target(n, ours)} == {n for n in NAMES if check_target_module_exists(theirs, n)}


PATTERNS = [
    {"q_proj": 2},
    {"proj": 3},  # not a whole name part: matches nothing
    {"layers.1.self_attn.q_proj": 5, "q_proj": 2},
    {"q_proj": 2, "layers.1.self_attn.q_proj": 5},  # the first key wins
    {"^model.layers.0.self_attn.q_proj": 7, "^q_proj": 9},  # '^': from the start of the full name only
    {r"layers\.(0|12)\..*": 4, "dense": 6},
    {"model.layers.0.self_attn.q_proj": 8},
]


@pytest.mark.parametrize("patterns", PATTERNS)
def test_rank_pattern_rule_is_peft_get_pattern_key(patterns):
    for name in NAMES:
        expected = patterns.get(get_pattern_key(patterns.keys(), name), 1)
        assert pattern_value(patterns, name, 1) == expected, name


@pytest.mark.parametrize("fields, words", [
    (dict(target_modules="all-linear", layers_to_transform=[0]), "layers_to_transform cannot be used with"),
    (dict(target_modules=".*q_proj", layers_to_transform=0), "layers_to_transform cannot be used with"),
    (dict(target_modules=".*q_proj", layers_pattern="layers"), "layers_pattern cannot be used with"),
    (dict(target_modules=["q_proj"], layers_pattern="layers"), "layers_pattern needs layers_to_transform"),
])
def test_peft_refusals_are_ours_with_the_combination_named(fields, words):
    with pytest.raises(ValueError, match=words):
        LoraConfig(**fields)
    with pytest.raises(ValueError):
        peft.LoraConfig(task_type="SEQ_CLS", **fields)


@pytest.mark.parametrize("fields, words", [
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(rank_pattern={"q_proj": 2.5}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(alpha_pattern={"q_proj": -1}), r"alpha_pattern\['q_proj'\] must be a positive number"),
    (dict(alpha_pattern={"q_proj": float("nan")}), r"alpha_pattern\['q_proj'\] must be a positive number"),
    (dict(lora_alpha=float("nan")), "lora_alpha must be a positive number, got nan"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a positive number, got inf"),
    (dict(rank_pattern={"q_proj(": 2}), "rank_pattern key 'q_proj\\(' is not a regex"),
    (dict(alpha_pattern={"[v": 2}), "alpha_pattern key '\\[v' is not a regex"),
    (dict(layers_to_transform=[0, "1"]), "layers_to_transform must be a layer index or a list"),
    (dict(layers_to_transform=-1), "layers_to_transform must be a layer index or a list"),
])
def test_bad_pattern_values_are_named(fields, words):
    with pytest.raises(ValueError, match=words):
        LoraConfig(target_modules=["q_proj"], **fields)


def test_layers_that_select_nothing_say_so():
    config = LoraConfig(target_modules=["q_proj"], layers_to_transform=[5])
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\].*no targeted module lies in those layers"):
        add_lora(tiny_model("llama"), config)
    with pytest.raises(ValueError, match=r"\[.q_prj.\] matched no module .* Nearest linear"):
        add_lora(tiny_model("llama"), LoraConfig(target_modules=["q_prj"], layers_to_transform=[0]))  # a typo


def test_order_dependent_rank_pattern_saves_resolved_so_peft_reloads_it(tmp_path):
    """PEFT's save sorts rank_pattern's keys, which changes which key comes first: PEFT cannot reload its own adapter
    here. We save each module's rank under its full name, so PEFT (and we) reload ours with the trained ranks."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                        rank_pattern={"v_proj": 2, "layers.1.self_attn.v_proj": 6})  # sorted, 6 would win
    ours, theirs = paired_models("llama", config)
    assert adapted_ranks(ours) == adapted_ranks(theirs)
    assert {r for r, _ in adapted_ranks(ours).values()} == {4, 2}  # 6 never wins: "v_proj" comes first
    save_adapter(ours, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == {"model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 2}
    peft_loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ours").eval()
    ours_loaded = load_adapter(tiny_model("llama"), tmp_path / "ours")
    assert adapted_ranks(peft_loaded) == adapted_ranks(ours_loaded) == adapted_ranks(ours)
    assert (rewards(peft_loaded, tiny_batch()) - rewards(ours, tiny_batch())).abs().max() < FP32_TOL

    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(RuntimeError, match="size mismatch"):  # PEFT 0.21 on its own save
        peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "theirs")
    with pytest.raises(ValueError, match=r"v_proj.lora_A.weight has shape \(2, 64\) .* but \(6, 64\) .*rank_pattern"):
        load_adapter(tiny_model("llama"), tmp_path / "theirs")


# -- the coverage check: layers left out on purpose load; adapters that do not fit are still refused


def peft_adapter(folder, arch="llama", layers=2, **fields):
    """A PEFT adapter with B != 0 saved from a tiny `arch` base with `layers` layers."""
    torch.manual_seed(0)
    base = tiny_model(arch)
    if layers != 2:
        config = base.config
        config.num_hidden_layers = layers
        torch.manual_seed(0)
        base = type(base)(config).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=4, **fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    model.save_pretrained(folder)
    return model.eval()


def test_adapter_of_some_layers_loads_and_equals_peft(tmp_path):
    """Used to be refused twice: by from_peft_dict (layers_to_transform) and by the coverage check (layer 0 unsaved)."""
    theirs = peft_adapter(tmp_path, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    ours = load_adapter(tiny_model("llama"), tmp_path)
    assert sorted(adapted_ranks(ours)) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert (rewards(ours, tiny_batch()) - rewards(theirs, tiny_batch())).abs().max() < FP32_TOL


def test_adapter_missing_layers_it_selects_is_still_refused(tmp_path):
    """Trained on a 2-layer base with layers_to_transform [1, 2, 3]: on a 4-layer base layers 2-3 have no weights."""
    peft_adapter(tmp_path, layers=2, target_modules=["q_proj"], layers_to_transform=[1, 2, 3])
    big = tiny_model("llama")
    big.config.num_hidden_layers = 4
    torch.manual_seed(0)
    big = type(big)(big.config)
    with pytest.raises(ValueError, match=r"2 base modules of the kinds it adapts \(in its layers_to_transform=\[1, 2, "
                       r"3\]\) have no saved weights: model.layers.2.self_attn.q_proj, model.layers.3.self_attn"):
        load_adapter(big, tmp_path)


def test_our_adapter_of_some_layers_on_a_deeper_base_names_the_missing_modules(tmp_path):
    """Our save names full targets; layers_to_transform [1, 2, 3] on a 2-layer base, loaded onto a 4-layer one."""
    config = LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1, 2, 3])
    save_adapter(add_lora(tiny_model("llama"), config), tmp_path)
    big = tiny_model("llama")
    big.config.num_hidden_layers = 4
    big = type(big)(big.config)
    with pytest.raises(ValueError, match=r"adapter does not fit .* 2 base modules of the kinds it adapts \(in its "
                       r"layers_to_transform=\[1, 2, 3\]\) have no saved weights: model.layers.2.self_attn.q_proj"):
        load_adapter(big, tmp_path)
    assert not any("lora" in name for name, _ in big.named_parameters())  # nothing half-loaded


def test_adapter_of_one_layer_without_its_layers_to_transform_is_refused(tmp_path):
    """The config says 'every layer' but the weights hold layer 1 only: the gap is not on purpose."""
    config = LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1])
    save_adapter(add_lora(tiny_model("llama"), config), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "target_modules": ["q_proj"], "layers_to_transform": None}))
    with pytest.raises(ValueError, match=r"1 base modules of the kinds it adapts have no saved weights: "
                       r"model.layers.0.self_attn.q_proj"):
        load_adapter(tiny_model("llama"), tmp_path)


def test_rank_pattern_removed_from_the_config_is_a_shape_error_naming_it(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
    save_adapter(add_lora(tiny_model("llama"), config), tmp_path)
    config_path = tmp_path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "rank_pattern": {}}))
    with pytest.raises(ValueError, match=r"has shape \(2, 64\) in the file but \(4, 64\) .* r and rank_pattern"):
        load_adapter(tiny_model("llama"), tmp_path)


# -- command line and run settings


def parsed(*flags: str) -> LoraConfig:
    return train_config_from_args(build_parser().parse_args(["train", *flags])).lora


def test_cli_takes_patterns_with_peft_field_names():
    lora = parsed("--target-modules", "q_proj,v_proj", "--rank-pattern", '{"v_proj": 16}', "--alpha-pattern",
                  '{"q_proj": 32.5}', "--layers-to-transform", "0,1", "--layers-pattern", "layers")
    assert (lora.rank_pattern, lora.alpha_pattern) == ({"v_proj": 16}, {"q_proj": 32.5})
    assert (lora.layers_to_transform, lora.layers_pattern) == ([0, 1], "layers")
    assert parsed("--target-modules", "q_proj", "--layers-to-transform", "1").layers_to_transform == 1
    assert parsed("--target-modules", "q_proj", "--layers-to-transform", "1", "--layers-pattern",
                  "layers,h").layers_pattern == ["layers", "h"]


@pytest.mark.parametrize("flags, words", [
    (["--rank-pattern", "v_proj=16"], "--rank-pattern must be a JSON object"),
    (["--alpha-pattern", "[1]"], "--alpha-pattern must be a JSON object"),
    (["--rank-pattern", '{"v_proj": 0}'], "--rank-pattern['v_proj'] must be a positive integer"),
    (["--target-modules", "q_proj", "--layers-to-transform", "one"], "--layers-to-transform must be a layer index"),
    (["--layers-to-transform", "0"], "--layers-to-transform cannot be used with target_modules='all-linear'"),
])
def test_bad_pattern_flags_are_usage_errors_naming_the_flag(flags, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *flags])
    assert exit_info.value.code == 2
    assert words in capsys.readouterr().err


def test_cli_trains_a_pattern_adapter_peft_loads_alike(tmp_path):
    output = tmp_path / "run"
    with contextlib.redirect_stderr(io.StringIO()):
        main(["train", "--output", str(output), "--max-rows", "40", "--max-steps", "2", "--batch-size", "4",
              "--no-progress", "--lora-r", "4", "--lora-alpha", "8", "--target-modules", "q_proj,v_proj,down_proj",
              "--rank-pattern", '{"v_proj": 2}', "--alpha-pattern", '{"q_proj": 16}', "--layers-to-transform", "1"])
    ours = load_adapter(builtin_model(builtin_tokenizer()), output).eval()
    assert adapted_ranks(ours) == {"model.layers.1.self_attn.q_proj": (4, 4.0), "model.layers.1.self_attn.v_proj":
                                   (2, 4.0), "model.layers.1.mlp.down_proj": (4, 2.0)}
    theirs = peft.PeftModel.from_pretrained(builtin_model(builtin_tokenizer()), output).eval()
    assert adapted_ranks(theirs) == adapted_ranks(ours)
    batch = builtin_tokenizer()(["1+1=2", "3+4=9"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert (ours(**batch).logits - theirs(**batch).logits).abs().max() < FP32_TOL
    run_settings = json.loads((output / "train_config.json").read_text())["lora"]
    assert (run_settings["rank_pattern"], run_settings["layers_to_transform"]) == ({"v_proj": 2}, 1)


def test_resume_sees_a_key_added_to_rank_pattern():
    """Nested dict settings were compared key by key, and a key only the new run has was skipped as 'new'."""
    saved = {"lora": {"r": 4, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {}}}
    now = {"lora": {"r": 4, "rank_pattern": {"q_proj": 8}, "alpha_pattern": {"v_proj": 32}}}
    assert changed_settings(saved, now) == [("lora.alpha_pattern", {}, {"v_proj": 32})]


def test_rslora_scales_each_module_by_its_own_rank_like_peft():
    ours, theirs = paired_models("llama", dataclasses.replace(rank_pattern_config("llama"), use_rslora=True))
    assert adapted_ranks(ours) == adapted_ranks(theirs)
    assert adapted_ranks(ours)["model.layers.1.self_attn.q_proj"] == (8, 16 / 8**0.5)
    with torch.no_grad():
        assert (rewards(ours, tiny_batch()) - rewards(theirs, tiny_batch())).abs().max() < FP32_TOL


def test_a_pattern_run_resumes_from_its_checkpoint(tmp_path):
    """checkpoint.py loads through the same coverage check: layer 0 left out on purpose must not stop a resume."""
    from runs import read_log, tiny_run

    from lora_rm.train import train

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                      layers_to_transform=1)
    train(tiny_run(tmp_path, max_steps=3, lora=lora))
    train(tiny_run(tmp_path, max_steps=6, lora=lora, resume=True))
    assert [r["step"] for r in read_log(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    resumed = load_adapter(builtin_model(builtin_tokenizer()), tmp_path)
    assert adapted_ranks(resumed) == {"model.layers.1.self_attn.q_proj": (4, 2.0), "model.layers.1.self_attn.v_proj":
                                      (2, 4.0), "model.layers.1.mlp.down_proj": (4, 2.0)}
