"""``moebal compare``: train one small MoE language model per balancing policy and compare.

The corpus is the running interpreter's own standard-library source (no downloads), read
as bytes; the model is a small decoder-only transformer with ``moebal.MoE`` in every FFN
slot. Every policy starts from the same weights and sees the same batches.

    from moebal.compare import CompareConfig, parse_policies, run_compare, write_all
    results = run_compare(CompareConfig(steps=100), parse_policies("aux-1e-2,loss-free,base"))
    write_all(results, "out/")     # results.json, maxvio_batch.png, load_heatmap.png
"""
from moebal.compare.corpus import Corpus, load_corpus
from moebal.compare.model import ModelConfig, MoELM
from moebal.compare.policies import DEFAULT_POLICIES, Policy, parse_policies, parse_policy
from moebal.compare.report import format_markdown_table, format_table, write_all
from moebal.compare.train import CompareConfig, run_compare, train_policy

__all__ = [
    "Corpus",
    "load_corpus",
    "ModelConfig",
    "MoELM",
    "DEFAULT_POLICIES",
    "Policy",
    "parse_policy",
    "parse_policies",
    "CompareConfig",
    "run_compare",
    "train_policy",
    "format_table",
    "format_markdown_table",
    "write_all",
]
