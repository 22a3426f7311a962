"""MoETrainer: transformers' ``Trainer`` with moebal's balancing in the loop.

Per training step it does the three things a hand-written loop does (README, "Into a
Hugging Face transformers model"):

- adds ``moebal.aux_loss(model)`` to the loss the Trainer optimises, scaled for gradient
  accumulation the way the Trainer scales the task loss;
- moves ``LossFree(update="manual")`` biases once per optimizer step, after
  ``optimizer.step()`` (:func:`moebal.register_bias_update_hook` on the Trainer's
  optimizer); ``update="auto"`` routers move in every training forward and get no hook;
- adds ``moe/aux_loss`` (the aux part of the logged ``loss``, averaged like it) and
  ``moebal.balance_report(model)`` to every training log, so ``report_to`` loggers and
  ``state.log_history`` carry them.

Why a ``compute_loss`` override and not the other hooks transformers offers:

- a ``TrainerCallback`` observes; nothing it returns changes the loss;
- ``Trainer(compute_loss_func=...)`` replaces the model's own loss: the Trainer takes the
  labels away from the model and the function would have to redo the causal LM loss
  (label shift, ignore index, ``num_items_in_batch`` normalisation) for every model type;
- wrapping ``model.forward`` to add the aux loss to ``outputs.loss`` changes what the
  model returns everywhere (eval, ``generate``, other libraries), and inside the forward
  the gradient-accumulation scaling the Trainer applies afterwards is unknown;
- ``compute_loss`` is the Trainer's documented extension point for the loss; the override
  calls the Trainer's own ``compute_loss`` (so label smoothing, ``compute_loss_func``,
  ``num_items_in_batch`` and the token averaging across devices stay as they are) and
  adds the aux loss to its result, knowing ``num_items_in_batch`` and the
  ``loss_is_scaled_for_ga`` rule ``training_step`` applies next.

Gradient accumulation: the Trainer divides a loss by the number of accumulated
micro-batches unless the model already normalised it over the whole accumulated batch
(``num_items_in_batch`` given to a model that takes loss kwargs, or a
``compute_loss_func``). The aux loss is each micro-batch's own mean, so it is divided here
exactly when the Trainer will not divide it; either way an optimizer step optimises
``task + mean over micro-batches of aux``, as a hand-written loop with ``loss / GA`` does.
Under data parallelism each rank adds its own aux loss and DDP averages the gradients.

The bias hook sits on the torch optimizer inside accelerate's wrapper, so a step that the
fp16 ``GradScaler`` skips moves no bias (its loads count toward the next step). Logged
balance statistics are this process's, from the last micro-batch's forward. Not covered:
DeepSpeed (it builds its own optimizer; call ``moebal.update_biases(model)`` from a
callback's ``on_optimizer_step`` instead) and ``torch.nn.DataParallel`` (``n_gpu > 1``:
the layers' aux losses live on the replicas), which raises.

:class:`MoETrainerMixin` carries the behaviour for other Trainer subclasses
(``class MySFT(MoETrainerMixin, SFTTrainer)``); :class:`MoETrainer` is it on ``Trainer``.
"""
from __future__ import annotations

import torch
from transformers import Trainer

from moebal.router import LossFree, Router
from moebal.training import aux_loss, balance_report, bias_update_hook_registered, moe_layers, register_bias_update_hook

__all__ = ["MoETrainer", "MoETrainerMixin"]


def _torch_optimizer(optimizer):
    """The torch optimizer inside accelerate's (or another) ``.optimizer`` wrapper."""
    while not _is_hookable(optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _is_hookable(optimizer) -> bool:
    # accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer without calling its
    # __init__: its own step() runs no hooks, the wrapped optimizer's does
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_post_hooks")


class MoETrainerMixin:
    """Adds moebal's aux loss, manual bias updates and balance logging to a ``Trainer``.

    Put it before the Trainer class: ``class MoETrainer(MoETrainerMixin, Trainer)``. The
    model must contain ``moebal.MoE`` layers (``moebal.swap_ffn``,
    ``moebal.hf.convert_moe_blocks``); ValueError otherwise.
    """

    def __init__(self, *args, **kwargs):
        self._moe_aux_sum = None  # detached sum of the aux contributions since the last log
        self._moe_aux_since = 0  # global step the sum started after
        self._moe_hooked = None  # the torch optimizer the bias hook is on
        super().__init__(*args, **kwargs)
        if not moe_layers(self.model):
            raise ValueError(
                f"{type(self).__name__} needs a model with moebal.MoE layers (moebal.swap_ffn, "
                f"moebal.hf.convert_moe_blocks); {type(self.model).__name__} has none"
            )
        if self.args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support torch.nn.DataParallel (n_gpu={self.args.n_gpu}): the MoE "
                "layers' aux losses are set on the replicas. Launch one process per GPU (torchrun / accelerate "
                "launch) instead"
            )

    # --- the optimised loss ----------------------------------------------------------------

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` will use ``compute_loss``'s result without dividing it
        by the gradient accumulation steps (transformers' own rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is not None:
            return bool(scaled)
        return bool(
            (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Trainer's loss plus ``moebal.aux_loss(model)`` in training (eval losses are the task's)."""
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.model.training:
            steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
            aux = aux_loss(self.model).to(loss.device)
            loss = loss + (aux / steps if self._loss_scaled_for_ga(num_items_in_batch) else aux)
            share = aux.detach() / steps  # what it adds to the loss the Trainer logs
            if self._moe_aux_sum is None:
                self._moe_aux_sum, self._moe_aux_since = share, self.state.global_step
            else:
                self._moe_aux_sum = self._moe_aux_sum + share
        return (loss, outputs) if return_outputs else loss

    # --- loss-free biases ------------------------------------------------------------------

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        self._hook_bias_updates(optimizer)
        return optimizer

    def _hook_bias_updates(self, optimizer) -> None:
        """Register the post-step bias update on the torch optimizer once (also across
        ``train()`` calls, and not when the user registered one on it already)."""
        routers = [m for m in self.model.modules() if isinstance(m, Router) and m.policy(LossFree) is not None]
        if optimizer is None or not any(r.policy(LossFree).update == "manual" for r in routers):
            return
        inner = _torch_optimizer(optimizer)
        if inner is self._moe_hooked or bias_update_hook_registered(inner, self.model):
            self._moe_hooked = inner
            return
        register_bias_update_hook(inner, self.model)  # raises for a mix of auto and manual routers
        self._moe_hooked = inner

    # --- logging -----------------------------------------------------------------------------

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Training logs (those with ``loss``) gain ``moe/aux_loss`` and ``balance_report(model)``."""
        if "loss" in logs and self._moe_aux_sum is not None:
            steps = max(self.state.global_step - self._moe_aux_since, 1)
            logs["moe/aux_loss"] = float(self._moe_aux_sum) / steps
            self._moe_aux_sum = None
            logs.update(balance_report(self.model))
        super().log(logs, *args, **kwargs)


class MoETrainer(MoETrainerMixin, Trainer):
    """``transformers.Trainer`` for models with ``moebal.MoE`` layers; takes Trainer's arguments.

    See :mod:`moebal.hf.trainer`: the optimised loss includes ``moebal.aux_loss(model)``
    (scaled for gradient accumulation), ``LossFree(update="manual")`` biases move once per
    optimizer step, and training logs carry ``moe/aux_loss`` and the balance report.
    """
