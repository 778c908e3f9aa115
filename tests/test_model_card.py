"""Exports carry a model card and tokenizer files that transformers 4.x and 5.x both read."""

import json
import shutil

from transformers import AutoTokenizer

from lnfree.data import corpus
from lnfree.export import PORTABLE_TOKENIZER_CLASS
from lnfree.model_card import FP16_WARNING, update_cards_with_control

# classes transformers 4.x can instantiate for a GPT-2 tokenizer.json (5.x writes "TokenizersBackend")
TRANSFORMERS4_CLASSES = {"GPT2TokenizerFast", "GPT2Tokenizer", "PreTrainedTokenizerFast"}


def _front_matter(text):
    assert text.startswith("---\n")
    head = text.split("---\n")[1]
    return head


def test_exports_carry_a_model_card_with_the_runs_numbers(tiny_run):
    summary, run = tiny_run
    for form in ("hf", "folded"):
        card = (run / "export" / form / "README.md").read_text()
        head = _front_matter(card)
        assert "layernorm-free" in head and "gpt2" in head
        assert "Transformers Don't Need LayerNorm" in card
        for site, sigma in summary["sigmas"].items():
            assert f"| {site} | {sigma:.6g} |" in card
        assert f"| this model | {summary['val_ce']:.4f} |" in card
        assert f"| original (before fine-tuning) | {summary['val_ce_before']:.4f} |" in card
        assert "| vanilla control | n/a |" in card
        assert "to_transformer_lens" in card and "to_nnsight" in card
    hf_card = (run / "export" / "hf" / "README.md").read_text()
    assert FP16_WARNING in hf_card and "GPT2LMHeadModel.from_pretrained" in hf_card
    assert "load_folded" in (run / "export" / "folded" / "README.md").read_text()


def test_make_eval_adds_the_control_ce_to_the_cards(tiny_run, tmp_path):
    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run / "export", copy / "export")
    shutil.copy(run / "summary.json", copy / "summary.json")
    written = update_cards_with_control(copy, 4.56789)
    assert len(written) == 2
    assert all("| vanilla control | 4.5679 |" in p.read_text() for p in written)


def test_tokenizer_files_load_with_transformers_4_rules(tiny_run):
    _, run = tiny_run
    for form in ("hf", "folded"):
        d = run / "export" / form
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        assert cfg["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
        assert cfg["tokenizer_class"] in TRANSFORMERS4_CLASSES
        assert not {"backend", "is_local", "local_files_only"} & set(cfg)
        assert (d / "tokenizer.json").exists()  # what GPT2TokenizerFast reads in both majors
        loaded, builtin = AutoTokenizer.from_pretrained(d), corpus.load_tokenizer()
        text = next(corpus.iter_texts("validation"))[:2000]
        assert loaded(text).input_ids == builtin(text).input_ids
        assert loaded.eos_token_id == builtin.eos_token_id


def test_card_front_matter_names_a_hub_base_model_and_a_vanilla_run_says_so():
    from lnfree.model_card import card_text

    lnfree = {"all_removed": True, "sigmas": {"lnf": 2.5}, "val_ce": 3.0, "val_ce_before": 2.9,
              "config": {"model": {"name": "gpt2", "source": "openai-community/gpt2"}, "schedule": {"name": "fast"},
                         "finetune": {"kind": "lora", "rank": 64, "alpha": 128, "target_modules": ["c_attn"]}}}
    card = card_text(lnfree, "hf", control_ce=2.95)
    head = _front_matter(card)
    assert "base_model: openai-community/gpt2" in head and "layernorm-free" in head
    assert "LoRA (rank 64" in card and "| vanilla control | 2.9500 |" in card and FP16_WARNING in card
    vanilla = {**lnfree, "all_removed": False, "sigmas": {},
               "config": {**lnfree["config"], "model": {"name": "w", "source": "builtin:w128"}}}
    card = card_text(vanilla, "hf")
    assert "base_model" not in _front_matter(card) and "vanilla-finetune" in _front_matter(card)
    assert FP16_WARNING not in card and "vanilla control" in card.split("\n")[card.split("\n").index("---", 1) + 1]
