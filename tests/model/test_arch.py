"""Architecture table: Llama and BERT layouts, feeders, structural fallback, clear errors."""

import pytest
import torch
from torch import nn

from lowbit.model.arch import ArchitectureError, resolve_arch

from .tiny import tiny_llama


def _groups(arch, block=0):
    return [([n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in g.linears],
             g.feeder and g.feeder.split(".", 3)[-1], g.feeder_kind)
            for g in arch.blocks[block].groups]


def test_llama_layout_groups_and_feeders():
    arch = resolve_arch(tiny_llama())  # 4 heads, 2 KV heads: grouped-query attention
    assert arch.layout == "llama" and len(arch.blocks) == 2
    assert arch.blocks[1].name == "model.layers.1"
    assert arch.final_norm == "model.norm" and arch.head == "lm_head"
    assert _groups(arch) == [
        (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm", "norm"),
        (["self_attn.o_proj"], None, None),  # v_proj is narrower than o_proj's input (GQA)
        (["mlp.gate_proj", "mlp.up_proj"], "post_attention_layernorm", "norm"),
        (["mlp.down_proj"], "mlp.up_proj", "linear"),
    ]


def test_llama_without_gqa_folds_v_into_o():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    arch = resolve_arch(LlamaForCausalLM(cfg))
    assert _groups(arch)[1] == (["self_attn.o_proj"], "self_attn.v_proj", "linear")


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=64)
    return BertModel(cfg).eval()


def test_bert_layout_has_no_norm_feeders():
    arch = resolve_arch(_tiny_bert())
    assert arch.layout == "bert" and [b.name for b in arch.blocks] == [
        "encoder.layer.0", "encoder.layer.1"]
    feeders = [(g.linears[-1].split("layer.0.")[1], g.feeder_kind) for g in arch.blocks[0].groups]
    assert feeders == [("attention.self.value", None), ("attention.output.dense", "linear"),
                       ("intermediate.dense", None), ("output.dense", None)]
    assert arch.head is None  # pooler.dense lies outside the blocks


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class _Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.stages = nn.ModuleList(_Block() for _ in range(3))

    def forward(self, x):
        x = self.stem(x)
        for b in self.stages:
            x = b(x)
        return x


def test_unknown_architecture_uses_the_structural_fallback():
    arch = resolve_arch(_Custom())
    assert arch.layout == "structural" and len(arch.blocks) == 3
    assert [g.linears for g in arch.blocks[2].groups] == [["stages.2.fc1"], ["stages.2.fc2"]]
    assert all(g.feeder is None for b in arch.blocks for g in b.groups)
    assert "structural fallback" in arch.notes[0]
    with pytest.raises(ArchitectureError, match="LAYOUTS"):
        resolve_arch(_Custom(), strict=True)


def test_missing_module_is_named():
    model = tiny_llama()
    for layer in model.model.layers:
        del layer.mlp.gate_proj
    with pytest.raises(ArchitectureError, match="model.layers.0 has no mlp.gate_proj"):
        resolve_arch(model, strict=True)
    arch = resolve_arch(model)  # falls back, and says why
    assert arch.layout == "structural" and "mlp.gate_proj" in arch.notes[0]


def test_no_blocks_is_a_clear_error():
    with pytest.raises(ArchitectureError, match="cannot find the blocks.*model.layers"):
        resolve_arch(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))


def test_both_views_derive_from_one_family_table():
    from lowbit.model.arch import LAYOUTS, GroupSpec, Layout, ResidualSpec
    from lowbit.runtime.arch import LLAMA_STYLE
    from lowbit.runtime.families import FAMILIES

    assert [lay.name for lay in LAYOUTS] == [f.name for f in FAMILIES]
    assert LAYOUTS[0] == Layout(  # what calibration walked when the paths were written here
        "llama", ("model.layers", "layers"),
        (GroupSpec(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                   "input_layernorm"),
         GroupSpec(("self_attn.o_proj",), "self_attn.v_proj"),
         GroupSpec(("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
         GroupSpec(("mlp.down_proj",), "mlp.up_proj")),
        ("model.norm", "norm"), ("lm_head",),
        (ResidualSpec("input_layernorm", "self_attn", kwargs=True),
         ResidualSpec("post_attention_layernorm", "mlp")))
    assert LAYOUTS[1] == Layout(
        "bert", ("encoder.layer", "bert.encoder.layer", "roberta.encoder.layer"),
        (GroupSpec(("attention.self.query", "attention.self.key", "attention.self.value")),
         GroupSpec(("attention.output.dense",), "attention.self.value"),
         GroupSpec(("intermediate.dense",)), GroupSpec(("output.dense",))))
    assert (LLAMA_STYLE.model_types, LLAMA_STYLE.embed, LLAMA_STYLE.layers,
            LLAMA_STYLE.final_norm, LLAMA_STYLE.rotary, LLAMA_STYLE.attention) == (
        ("llama", "mistral", "qwen2"), "model.embed_tokens", "model.layers", "model.norm",
        "model.rotary_emb", "self_attn")
