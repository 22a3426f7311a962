"""moebal.hf.MoETrainer: a real transformers Trainer run on a tiny swapped Llama (random
weights built from a config, random token ids, CPU) against a hand-written loop."""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", reason="the HF integration tests need transformers (moebal[hf])")
pytest.importorskip("accelerate", reason="transformers' Trainer needs accelerate (moebal[hf])")

import moebal  # noqa: E402
from moebal import AuxLoss, LossFree, Router  # noqa: E402
from moebal.hf.trainer import MoETrainer  # noqa: E402
from moebal.routing import loss_free_update  # noqa: E402

V, S, D, E, K = 97, 12, 64, 4, 2
BATCH, GA, STEPS, LR, RATE = 2, 2, 3, 1e-3, 0.05


def _router(update="manual", alpha=0.1):
    """DeepSeek-V3's recipe: a loss-free bias chooses, a Switch aux loss (alpha large enough
    to change training visibly in three steps) adds to the loss."""
    return lambda: Router(D, E, K, score="sigmoid", balancer=(LossFree(rate=RATE, update=update), AuxLoss(alpha)))


def _model(router=None, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg)
    moebal.swap_ffn(model, E, K, router=router or _router())
    return model


def _data(n=BATCH * GA * STEPS, seed=1):
    ids = torch.randint(0, V, (n, S), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def _args(tmp_path, **overrides):
    kw = dict(output_dir=str(tmp_path), per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
              max_steps=STEPS, learning_rate=LR, lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0,
              max_grad_norm=0.0, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
              train_sampling_strategy="sequential", disable_tqdm=True)
    return transformers.TrainingArguments(**{**kw, **overrides})


def _routers(model):
    return [layer.mlp.router for layer in model.model.layers]


def _manual_loop(model, data, with_aux=True, per_batch_mean=False):
    """The reference: AdamW as the Trainer builds it, GA micro-batches per step, the bias hook.

    ``per_batch_mean``: each micro-batch's own mean CE divided by GA (how the Trainer scales
    a model that takes no loss kwargs); otherwise the CE summed over the step's tokens.
    """
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    moebal.register_bias_update_hook(opt, model)
    model.train()
    losses = []
    for step in range(STEPS):
        rows = data[step * BATCH * GA:(step + 1) * BATCH * GA]
        micro = [torch.stack([r["input_ids"] for r in rows[i * BATCH:(i + 1) * BATCH]]) for i in range(GA)]
        n_tokens = sum(ids[:, 1:].numel() for ids in micro)
        total = 0.0
        for ids in micro:
            logits = model(input_ids=ids).logits[:, :-1].flatten(0, 1).float()
            if per_batch_mean:
                task = F.cross_entropy(logits, ids[:, 1:].flatten()) / GA
            else:
                task = F.cross_entropy(logits, ids[:, 1:].flatten(), reduction="sum") / n_tokens
            loss = task + moebal.aux_loss(model) / GA if with_aux else task
            loss.backward()
            total += float(loss.detach())
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses


def _max_param_diff(a, b):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    return max(float((pa[k] - pb[k]).detach().abs().max()) for k in pa)


def _train(tmp_path, model, data, accepts_loss_kwargs=True, **args):
    trainer = MoETrainer(model=model, args=_args(tmp_path, **args), train_dataset=data)
    if not accepts_loss_kwargs:  # the Trainer then divides each micro-batch's mean loss by GA
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return trainer, [h["loss"] for h in trainer.state.log_history if "loss" in h]


# Both of the Trainer's gradient-accumulation conventions: True, the model normalises the
# CE over the whole step's tokens (num_items_in_batch) and the Trainer does not divide, so
# MoETrainer divides the aux loss by GA; False, the Trainer divides loss and aux by GA.
@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_trainer_optimises_task_plus_aux_loss_like_a_manual_loop(tmp_path, accepts_loss_kwargs):
    data = _data()
    model, ref, no_aux = _model(), _model(), _model()
    trainer, logged = _train(tmp_path, model, data, accepts_loss_kwargs)
    ref_losses = _manual_loop(ref, data, per_batch_mean=not accepts_loss_kwargs)
    no_aux_losses = _manual_loop(no_aux, data, with_aux=False, per_batch_mean=not accepts_loss_kwargs)

    assert _max_param_diff(model, ref) <= 1e-6
    for r_t, r_m in zip(_routers(model), _routers(ref)):  # same loads, same bias steps
        torch.testing.assert_close(r_t.expert_bias, r_m.expert_bias, rtol=0, atol=1e-6)
    assert len(logged) == STEPS
    assert max(abs(a - b) for a, b in zip(logged, ref_losses)) <= 1e-6
    # the comparison can fail: without the aux loss training goes elsewhere
    assert _max_param_diff(model, no_aux) > 1e-4
    aux_logged = [h["moe/aux_loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(aux_logged) == STEPS and min(aux_logged) > 0
    # step 1 starts from the same weights in both loops: the logged loss is task + logged aux
    assert abs(logged[0] - (no_aux_losses[0] + aux_logged[0])) <= 1e-6


def _count_bias_updates(monkeypatch):
    calls = []
    apply = LossFree.apply

    def counting(self, router, load_E=None):
        calls.append(router)
        return apply(self, router, load_E)

    monkeypatch.setattr(LossFree, "apply", counting)
    return calls


def _snapshot(kind, model, calls):
    routers = _routers(model)
    return kind, len(calls), [r.load_counts.clone() for r in routers], [r.expert_bias.clone() for r in routers]


def test_manual_biases_move_once_per_optimizer_step_with_all_micro_batches_loads(tmp_path, monkeypatch):
    calls, seen = _count_bias_updates(monkeypatch), []

    class Watch(transformers.TrainerCallback):
        def on_substep_end(self, args, state, control, model=None, **kw):  # after micro-batch 1 of 2
            seen.append(_snapshot("substep", model, calls))

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            seen.append(_snapshot("pre", model, calls))

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            seen.append(_snapshot("post", model, calls))

    model = _model()
    MoETrainer(model=model, args=_args(tmp_path), train_dataset=_data(), callbacks=[Watch()]).train()
    assert [kind for kind, *_ in seen] == ["substep", "pre", "post"] * STEPS
    assert len(calls) == 2 * STEPS  # one update per router per optimizer step
    bias = [torch.zeros(E) for _ in _routers(model)]
    for i in range(STEPS):
        sub, pre, post = seen[3 * i:3 * i + 3]
        (_, n_sub, sub_counts, sub_bias), (_, n_pre, counts, pre_bias), (_, n_post, after, post_bias) = sub, pre, post
        assert n_sub == n_pre == 2 * i and n_post == 2 * (i + 1)
        for layer in range(2):
            assert int(sub_counts[layer].sum()) == BATCH * S * K  # one micro-batch counted, bias unmoved
            assert torch.equal(sub_bias[layer], bias[layer]) and torch.equal(pre_bias[layer], bias[layer])
            assert int(counts[layer].sum()) == GA * BATCH * S * K  # both micro-batches reach the one update
            bias[layer] = loss_free_update(bias[layer], counts[layer], RATE)
            torch.testing.assert_close(post_bias[layer], bias[layer], rtol=0, atol=0)
            assert int(after[layer].sum()) == 0
    assert all(float(b.abs().sum()) > 0 for b in bias)


def test_training_logs_carry_the_balance_report(tmp_path):
    trainer, _ = _train(tmp_path, _model(), _data(), logging_steps=2, max_steps=4)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h in logs:
        assert {"moe/aux_loss", "moe/layer0/max_violation", "moe/layer1/entropy", "moe/layer1/aux_loss",
                "moe/max_violation_max"} <= set(h)
        assert h["moe/aux_loss"] > 0 and h["moe/layer0/max_violation"] >= 0


def test_auto_routers_need_no_hook_and_still_move(tmp_path):
    model = _model(router="loss_free")  # update="auto": the bias moves in every training forward
    trainer, _ = _train(tmp_path, model, _data())
    assert trainer._moe_hooked is None
    assert not moebal.training.bias_update_hook_registered(trainer.optimizer.optimizer, model)
    assert all(float(r.expert_bias.abs().sum()) > 0 for r in _routers(model))


def test_a_hook_the_user_registered_is_not_doubled(tmp_path, monkeypatch):
    calls = _count_bias_updates(monkeypatch)
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    moebal.register_bias_update_hook(opt, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    trainer = MoETrainer(model=model, args=_args(tmp_path), train_dataset=_data(), optimizers=(opt, sched))
    trainer.train()
    assert len(calls) == 2 * STEPS and len(opt._optimizer_step_post_hooks) == 1
    trainer.train(resume_from_checkpoint=None)  # a second train() call on the same optimizer adds no hook
    assert len(calls) == 4 * STEPS and len(opt._optimizer_step_post_hooks) == 1


def test_a_model_without_moe_layers_is_refused(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=D, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V)
    with pytest.raises(ValueError, match="moebal.MoE"):
        MoETrainer(model=transformers.LlamaForCausalLM(cfg), args=_args(tmp_path), train_dataset=_data())


# --- register_bias_update_hook on swapped models (issue 14, item 4) ---------------------------


def test_hook_error_for_auto_routers_says_how_to_get_manual_mode():
    model = _model(router="loss_free")
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="update='auto'") as err:
        moebal.register_bias_update_hook(opt, model)
    assert "router_kwargs={'update': 'manual'}" in str(err.value)
    assert "LossFree(update='manual')" in str(err.value)


def test_hook_refuses_a_second_registration_for_the_same_model():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    handle = moebal.register_bias_update_hook(opt, model)
    with pytest.raises(ValueError, match="already registered"):
        moebal.register_bias_update_hook(opt, model)
    handle.remove()
    moebal.register_bias_update_hook(opt, model)  # after remove() it may be registered again
