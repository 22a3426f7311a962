"""moebal.compare: the embedded corpus, the policies, and the whole pipeline on a tiny model."""
import hashlib
import json
import math
import pathlib

import pytest
import torch

from moebal.compare.corpus import is_validation, load_corpus, stdlib_files
from moebal.compare.model import ModelConfig
from moebal.compare.policies import DEFAULT_POLICIES, parse_policies, parse_policy
from moebal.compare.report import format_markdown_table, format_table, write_all
from moebal.compare.train import CompareConfig, build_model, run_compare

# A model small enough that four policies train in a few seconds; E=4, K=2 and
# batch*seq = 64 tokens keep T*K % E == 0 for BASE.
TINY_MODEL = ModelConfig(layers=2, d_model=32, heads=2, num_experts=4, expert_hidden=16, top_k=2, max_seq_len=64)
TINY = CompareConfig(steps=10, batch=4, seq_len=16, lr=3e-3, warmup=2, val_tokens=256, log_every=5, model=TINY_MODEL)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


# --- corpus -------------------------------------------------------------------------------


def test_corpus_is_deterministic(corpus):
    again = load_corpus()
    assert again.sha256 == corpus.sha256
    assert again.train_files == corpus.train_files and again.val_files == corpus.val_files
    assert torch.equal(again.train, corpus.train) and torch.equal(again.val, corpus.val)
    first = [x for x, _ in zip(corpus.train_batches(4, 32, seed=7), range(3))]
    second = [x for x, _ in zip(again.train_batches(4, 32, seed=7), range(3))]
    for (a_in, a_tg), (b_in, b_tg) in zip(first, second):
        assert torch.equal(a_in, b_in) and torch.equal(a_tg, b_tg)
    # a different seed gives a different order
    other = next(corpus.train_batches(4, 32, seed=8))[0]
    assert not torch.equal(other, first[0][0])


def test_train_and_validation_never_share_a_file(corpus):
    train, val = set(corpus.train_files), set(corpus.val_files)
    assert train.isdisjoint(val)
    assert train | val == set(stdlib_files())
    assert corpus.train_files == sorted(corpus.train_files)
    # the split is a fixed function of the path: roughly 10 % validation, never test dirs
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.2
    assert not any("/test/" in f or f.startswith("test/") or "site-packages" in f for f in train | val)


def test_split_depends_on_the_path_alone():
    # sha256 of the relative path, first 8 bytes as a big-endian fraction of 2**64
    for path in ("os.py", "json/decoder.py", "asyncio/tasks.py", "xml/dom/minidom.py"):
        h = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2**64
        assert is_validation(path) == (h < 0.10)
    assert is_validation("os.py", val_percent=99.999) or not is_validation("os.py", val_percent=0.001)


def test_windows_and_targets_are_shifted_bytes(corpus):
    inputs, targets = next(corpus.train_batches(3, 20, seed=0))
    assert inputs.shape == targets.shape == (3, 20) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(inputs.max()) < 256
    val = list(corpus.val_batches(4, 16, max_tokens=128))
    assert len(val) == 2 and all(x.shape == (4, 16) for x, _ in val)


def test_corpus_from_a_given_root(tmp_path):
    for i in range(40):
        (tmp_path / f"m{i:02d}.py").write_text(f"x = {i}\n" * 20)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "skipped.py").write_text("skipped\n")
    c = load_corpus(tmp_path)
    assert "test/skipped.py" not in c.train_files + c.val_files
    assert len(c.train_files) + len(c.val_files) == 40
    assert b"skipped" not in bytes(c.train.tolist()) + bytes(c.val.tolist())


def test_held_out_training_chunks_never_reach_training(corpus):
    from moebal.compare.corpus import CHUNK, HOLD_AT, HOLD_EVERY

    stream = b"".join(
        (pathlib.Path(corpus.root) / rel).read_bytes() + b"\x00" for rel in corpus.train_files
    )
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    held = [c for i, c in enumerate(chunks) if i % HOLD_EVERY == HOLD_AT]
    assert bytes(corpus.val_in.tolist()) == b"".join(held)
    train = bytes(corpus.train.tolist())
    assert len(train) + len(b"".join(held)) == len(stream)
    # the training stream is the other chunks, in order: no held-out chunk is in it
    assert train == b"".join(c for i, c in enumerate(chunks) if i % HOLD_EVERY != HOLD_AT)
    assert 0.04 < len(corpus.val_in) / len(stream) < 0.06


# --- policies and config ------------------------------------------------------------------


def test_policy_names():
    assert [p.name for p in parse_policies(",".join(DEFAULT_POLICIES))] == list(DEFAULT_POLICIES)
    lf = parse_policy("loss-free")
    assert (lf.kind, lf.score, lf.coefficient) == ("loss_free", "sigmoid", 1e-3)
    assert parse_policy("loss-free-1e-2").coefficient == 1e-2
    assert parse_policy("aux-3e-3").coefficient == 3e-3
    router = parse_policy("aux-1e-2").make_router(8, 4, 2)
    assert router.balancer.alpha == 1e-2 and router.score == "softmax"
    for bad in ("foo", "aux-", "aux-x", "loss-free-nan", "aux--1"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy(bad)
    with pytest.raises(ValueError, match="twice"):
        parse_policies("base,base")
    with pytest.raises(ValueError, match="no policy"):
        parse_policies(" , ")


def test_config_rejects_batches_base_cannot_balance():
    with pytest.raises(ValueError, match="multiple of num_experts"):
        CompareConfig(batch=3, seq_len=5, model=TINY_MODEL)  # 15 * 2 % 4 != 0
    with pytest.raises(ValueError, match="steps"):
        CompareConfig(steps=0)


def test_every_policy_starts_from_the_same_weights():
    models = [build_model(TINY, p) for p in parse_policies("aux-1e-2,loss-free,base")]
    params = [dict(m.named_parameters()) for m in models]
    for name, ref in params[0].items():
        for other in params[1:]:
            assert torch.equal(ref, other[name]), name


# --- the pipeline end to end --------------------------------------------------------------


def test_compare_end_to_end(corpus, tmp_path):
    lines = []
    names = tuple(dict.fromkeys(DEFAULT_POLICIES + ("loss-free", "base")))  # the default set, with these two
    results = run_compare(TINY, parse_policies(",".join(names)), corpus, progress=lines.append)
    paths = write_all(results, tmp_path)

    saved = json.loads(paths["json"].read_text())
    assert [p["name"] for p in saved["policies"]] == list(names)
    for p in saved["policies"]:
        for key in ("val_bpb", "val_in_bpb", "maxvio_global", "maxvio_global_in", "maxvio_batch", "dropped_frac",
                    "tokens_per_s"):
            assert isinstance(p[key], float) and math.isfinite(p[key]) and p[key] >= 0, (p["name"], key)
        assert len(p["history"]["maxvio_batch"]) == TINY.steps
        assert len(p["val_load"]) == TINY_MODEL.layers
        assert all(sum(layer) == p["val_tokens"] * TINY_MODEL.top_k for layer in p["val_load"])
        assert p["dropped_frac"] == 0.0  # dropless
        assert 2.0 < p["val_bpb"] < 9.0  # better than nothing, nowhere near trained
    assert saved["config"]["steps"] == TINY.steps and saved["versions"]["torch"] == torch.__version__
    assert saved["device"]["device"] == "cpu"

    by_name = {p["name"]: p for p in saved["policies"]}
    # BASE gives every expert exactly T*K/E tokens in training: MaxVio_batch is exactly 0
    assert by_name["base"]["maxvio_batch"] == 0.0
    assert all(v == 0.0 for v in by_name["base"]["history"]["maxvio_batch"])
    assert by_name["loss-free"]["loss_free_bias"] is not None
    # the sign update moves each bias by at most `rate` per step
    bias = torch.tensor(by_name["loss-free"]["loss_free_bias"])
    assert float(bias.abs().max()) <= TINY.steps * 1e-3 + 1e-6

    for name in ("maxvio", "heatmap"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("[base] step 10/10" in line for line in lines)
    table = format_table(saved)
    assert all(name in table for name in names) and "MaxVio_global" in table and "MaxVio_in" in table
    assert format_markdown_table(saved).count("\n") == len(names) + 1


def test_router_v2_policy_names():
    cases = {
        "loss-free-prop": ("loss_free_prop", 0.3), "loss-free-prop-0.5": ("loss_free_prop", 0.5),
        "loss-free-center": ("loss_free_center", 1e-3), "loss-free+seq": ("loss_free_seq", None),
        "limoe": ("limoe", None), "vmoe": ("vmoe", None), "hash": ("hash", 1.0), "hash-4gram": ("hash", 4.0),
        "null-4": ("null", 4.0),
    }
    for name, (kind, coefficient) in cases.items():
        p = parse_policy(name)
        assert (p.kind, p.coefficient) == (kind, coefficient), name
    r = parse_policy("loss-free+seq").make_router(8, 4, 2)
    assert [type(b).__name__ for b in r.balancer] == ["LossFree", "AuxLoss"] and r.balancer[1].variant == "sequence"
    assert parse_policy("loss-free-prop").make_router(8, 4, 2).balancer.rule == "proportional"
    assert parse_policy("null-3").make_router(8, 4, 2).num_null_experts == 3
    with pytest.raises(ValueError, match="training tokens"):
        parse_policy("hash-2gram").make_router(8, 4, 2)
    for bad in ("hash-0gram", "hash-xgram", "null-0", "null-", "loss-free-prop-x"):
        with pytest.raises(ValueError, match="policy"):
            parse_policy(bad)


def test_router_v2_policies_train_end_to_end(corpus, tmp_path):
    names = "loss-free-prop,loss-free+seq,limoe,vmoe,hash-4gram,null-2"
    results = run_compare(TINY, parse_policies(names), corpus)
    saved = json.loads(write_all(results, tmp_path)["json"].read_text())
    by_name = {p["name"]: p for p in saved["policies"]}
    assert list(by_name) == names.split(",")
    for p in saved["policies"]:
        for key in ("val_bpb", "maxvio_global", "maxvio_batch", "tokens_per_s"):
            assert math.isfinite(p[key]) and p[key] >= 0, (p["name"], key)
        assert 2.0 < p["val_bpb"] < 9.0, p["name"]
    # null picks are not expert load: the real experts get fewer than T*K pairs
    assert all(sum(layer) < by_name["null-2"]["val_tokens"] * TINY_MODEL.top_k for layer in by_name["null-2"]["val_load"])
    assert all(sum(layer) == by_name["hash-4gram"]["val_tokens"] * TINY_MODEL.top_k for layer in by_name["hash-4gram"]["val_load"])
