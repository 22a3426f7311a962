"""The README's Hugging Face snippet runs exactly as written, on a tiny local Llama."""
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")

import moebal  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
V = 97


def _hf_snippet() -> str:
    """The first ```python block under the README's "Into a Hugging Face transformers model"."""
    text = README.read_text()
    section = text[text.index("### Into a Hugging Face transformers model"):]
    section = section[:section.index("\n### ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's HF section has no python block"
    return blocks[0]


def test_readme_hf_snippet_runs_as_written():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, V, (3, 2, 12), generator=torch.Generator().manual_seed(1))
    logged = []
    # the names the README says the snippet assumes, and nothing else
    namespace = {"model": model, "batches": [{"input_ids": b, "labels": b} for b in ids], "log": logged.append}
    dense_down = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    exec(compile(_hf_snippet(), str(README), "exec"), namespace)

    assert [r.layer for r in namespace["report"]] == [0, 1]
    layer = model.model.layers[0].mlp
    assert isinstance(layer, moebal.MoE) and layer.router.policy(moebal.LossFree).update == "manual"
    # the optimizer was built after the swap, so the experts trained
    assert not torch.equal(layer.experts.w_out_EFD[0], dense_down.t())
    # three steps, three bias updates through the hook, every pending count consumed
    for r in (m.mlp.router for m in model.model.layers):
        assert float(r.expert_bias.abs().sum()) > 0 and int(r.load_counts.sum()) == 0
    assert len(logged) == 3 and all("moe/layer1/max_violation" in entry for entry in logged)
