"""Hugging Face transformers integration: put moebal into existing models.

- :func:`swap_ffn` replaces dense FFNs with ``moebal.MoE`` layers, optionally sparse-
  upcycled so the model's output is unchanged at initialisation; :func:`register_ffn`
  describes an FFN it does not know (:class:`FFNPattern`).
- :func:`convert_moe_blocks` / :func:`restore_moe_blocks` (and the per-block
  :func:`from_hf_moe_block` / :func:`to_hf_moe_block`) turn transformers' own MoE blocks
  (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) into ``moebal.MoE`` and back, bit-exact
  in the weights, raising :class:`ConversionError` on anything moebal cannot represent.
- :func:`attach_token_source` (called by both) hands the model's ``attention_mask`` and
  ``input_ids`` to every moebal layer, so padding is neither routed nor counted.

transformers itself is imported lazily (only to recognise its module classes), so this
package imports without it.

Saving and loading: ``moebal.hf.save_pretrained(model, path)`` records the swap in
``config.json`` and ``moebal.hf.from_pretrained(path)`` rebuilds the model bit for bit
(biases and counters included); ``to_native(model)`` gives the native HF MoE architecture
(Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V3) that any loader serves without moebal.
Plain ``transformers`` loading of a moebal checkpoint gives the dense model (see
:mod:`moebal.hf.native`).
"""
from moebal.hf._keys import ConversionError
from moebal.hf._models import Replacement, SwapReport
from moebal.hf.blocks import convert_moe_blocks, from_hf_moe_block, restore_moe_blocks, to_hf_moe_block
from moebal.hf.native import from_pretrained, save_pretrained, to_native
from moebal.hf.ffn_patterns import FFNPattern, ffn_patterns, register_ffn, unregister_ffn
from moebal.hf.swap import MoEWithDropout, MoEWithResidual, swap_ffn
from moebal.hf.tokens import TokenSource, attach_token_source, detach_token_source

__all__ = [
    "MoETrainer",
    "MoETrainerMixin",
    "swap_ffn",
    "to_native",
    "save_pretrained",
    "from_pretrained",
    "convert_moe_blocks",
    "restore_moe_blocks",
    "from_hf_moe_block",
    "to_hf_moe_block",
    "MoEWithDropout",
    "MoEWithResidual",
    "register_ffn",
    "unregister_ffn",
    "ffn_patterns",
    "FFNPattern",
    "attach_token_source",
    "detach_token_source",
    "TokenSource",
    "SwapReport",
    "Replacement",
    "ConversionError",
]


def __getattr__(name):  # MoETrainer imports transformers.Trainer (and accelerate): only when asked for
    if name in ("MoETrainer", "MoETrainerMixin"):
        from moebal.hf import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
