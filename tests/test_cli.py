"""The moebal command: help, bad options, info, and a tiny compare run."""
import json
import os
import subprocess
import sys

import pytest
import torch

import moebal

from moebal.cli import main


pytestmark = pytest.mark.usefixtures("one_thread")


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["bench", "--help"], ["info", "--help"]])
def test_help_exits_zero(argv, capsys):
    code, out = _exit_code(argv, capsys)
    assert code == 0 and "usage: moebal" in out.out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compare", "--policies", "aux-1e-2,bogus"], "unknown policy 'bogus'"),
        (["compare", "--policies", ""], "no policy given"),
        (["compare", "--steps", "-5"], "--steps: expected a positive integer, got '-5'"),
        (["compare", "--steps", "0"], "--steps: expected a positive integer"),
        (["compare", "--steps", "ten"], "--steps: expected a positive integer"),
        (["compare", "--device", "tpu"], "unknown device 'tpu'"),
        (["compare", "--experts", "4", "--top-k", "8"], "top_k=8 must be <= num_experts=4"),
        (["compare", "--batch", "3", "--seq-len", "5"], "multiple of num_experts"),
        (["compare", "--seeds", "0"], "--seeds: expected a positive integer"),
        (["compare", "--preset", "short"], "invalid choice: 'short'"),
        (["compare", "--plot", "/nonexistent/results.json"], "argument --plot: cannot read"),
        (["bench", "--configs", "A,Z"], "unknown config(s) Z"),
        (["bench", "--dtypes", "fp64"], "--dtypes: expected a comma list of fp32, bf16"),
        (["bench", "--threads", "0"], "--threads: expected a positive integer"),
        (["bench", "--plot", "out.png"], "--plot PNG needs --from JSON"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "required: {compare,bench,multitask,info}"),
    ],
)
def test_bad_options_exit_2_with_a_message(argv, message, capsys):
    code, out = _exit_code(argv, capsys)
    assert code == 2
    assert message in out.err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys):
    code, out = _exit_code(["compare", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in out.err


def test_info(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch           {torch.__version__}" in out
    assert "backend 'auto'  torch" in out and "moebal" in out and "triton" in out
    assert f"expert paths    CPU kind {moebal.expert_paths.CPU_KIND!r}" in out


def test_info_names_a_cpu_without_a_path_table(capsys, monkeypatch):
    from moebal import expert_paths

    monkeypatch.setattr(expert_paths, "CPU_KIND", "avx2")
    monkeypatch.setattr(expert_paths, "_ACTIVE", [expert_paths.PathRule(table={})])
    assert main(["info", "--device", "cpu"]) == 0
    assert "CPU kind 'avx2' has no measured table: inference takes 'loop'" in capsys.readouterr().out


def test_tiny_compare_through_the_cli(tmp_path, capsys):
    argv = [
        "compare", "--steps", "4", "--policies", "aux-1e-3,base", "--out", str(tmp_path / "run"), "--no-plots",
        "--layers", "1", "--d-model", "16", "--heads", "2", "--experts", "4", "--expert-hidden", "8",
        "--batch", "2", "--seq-len", "16", "--val-tokens", "64", "--log-every", "2", "--seed", "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert out.out.splitlines()[0].startswith("policy") and "base" in out.out  # the table on stdout
    assert "[aux-1e-3] step 2/4" in out.err and "step 2/4" not in out.out  # progress on stderr only
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [p["name"] for p in saved["policies"]] == ["aux-1e-3", "base"]
    assert saved["config"]["seed"] == 3 and saved["config"]["model"]["num_experts"] == 4
    assert saved["policies"][1]["maxvio_batch"] == 0.0


def test_seeds_summarise_and_plot_redraws_from_the_json(tmp_path, capsys):
    argv = [
        "compare", "--steps", "3", "--policies", "aux-1e-2,loss-free", "--out", str(tmp_path / "run"), "--no-plots",
        "--layers", "1", "--d-model", "16", "--heads", "2", "--experts", "4", "--expert-hidden", "8",
        "--batch", "2", "--seq-len", "16", "--val-tokens", "64", "--seed", "5", "--seeds", "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["seeds"] == [5, 6, 7] and len(saved["runs"]) == 3
    for i, summary in enumerate(saved["summary"]):  # by hand: mean, sample sd, min, max over the 3 seeds
        values = [run[i]["val_bpb"] for run in saved["runs"]]
        mean = sum(values) / 3
        sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
        st = summary["val_bpb"]
        assert st["mean"] == pytest.approx(mean, rel=1e-12) and st["sd"] == pytest.approx(sd, rel=1e-9)
        assert (st["min"], st["max"]) == (min(values), max(values))
    assert saved["runs"][0] == saved["policies"]
    assert saved["runs"][0][0]["val_bpb"] != saved["runs"][1][0]["val_bpb"]  # another seed, another run
    assert "3 seeds (5, 6, 7)" in out.out and " ± " in out.out
    assert "On the quality-vs-balance frontier" in out.out  # the reading follows the table

    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert main(["compare", "--plot", str(tmp_path / "run" / "results.json")]) == 0
    redrawn = capsys.readouterr()
    assert redrawn.out.splitlines()[0].startswith("policy") and " ± " in redrawn.out
    for name in ("maxvio_batch.png", "load_heatmap.png", "frontier.png"):
        assert (tmp_path / "run" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "run" / "report.md").read_text()
    assert report.startswith("# moebal compare") and "| policy |" in report and "frontier.png" in report
    assert "3 seeds" in report and "cannot be told apart" in report
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, out = _exit_code(["compare", "--plot", str(bad)], capsys)
    assert code == 2 and "not a moebal compare results.json" in out.err


def test_frontier_and_reading_by_hand():
    from moebal.compare.report import frontier, reading

    def pol(name, bpb, vio):
        return {"name": name, "val_bpb": bpb, "maxvio_global": vio}

    results = {"config": {"seed": 0}, "policies": [
        pol("aux-1e-2", 2.85, 0.90), pol("aux-1e-3", 2.96, 1.79), pol("loss-free", 2.95, 1.90),
        pol("loss-free-prop", 2.93, 0.48), pol("base", 2.97, 2.40),
    ]}
    # aux-1e-3, loss-free and base are each beaten on both measures by loss-free-prop
    assert frontier(results) == ["aux-1e-2", "loss-free-prop"]
    text = reading(results)
    assert "frontier" in text and "aux-1e-2, loss-free-prop" in text and "One seed" in text
    assert "loss-free-prop vs aux-1e-3" in text  # lower MaxVio_global at better bpb
    results["policies"][3]["val_bpb"] = 2.99  # now worse than both aux policies in bpb
    results["policies"][2]["maxvio_global"] = 1.95
    assert "does not appear" in reading(results)


def test_policies_all_is_every_family():
    from moebal.compare.policies import ALL_POLICIES, parse_policies

    # expert choice is listed under the name its rows carry in the tables: it sees later tokens
    shown = {"expert-choice": "expert-choice-leaks-future"}
    assert [p.name for p in parse_policies("all")] == [shown.get(n, n) for n in ALL_POLICIES]
    assert {"hash-4gram", "limoe", "vmoe", "null-4", "loss-free+seq", "none"} <= set(ALL_POLICIES)


def test_within_spread_by_hand():
    from moebal.compare.report import within_spread

    def st(lo, hi):
        return {"val_bpb": {"mean": (lo + hi) / 2, "sd": 0.0, "min": lo, "max": hi}}

    results = {"seeds": [0, 1], "summary": [
        {"name": "a", **st(2.90, 2.96)},  # mean 2.93, spread 0.06
        {"name": "b", **st(2.95, 2.97)},  # mean 2.96: 0.03 from a, within a's spread
        {"name": "c", **st(3.10, 3.11)},  # 0.15+ from both
    ]}
    assert within_spread(results) == [("a", "b")]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "moebal", "compare", "--policies", "nope"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "unknown policy 'nope'" in done.stderr


def test_bench_runs_saves_and_plots_from_the_saved_json(tmp_path, capsys):
    pytest.importorskip("moebal.bench")
    pytest.importorskip("matplotlib")
    json_path, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--configs", "tiny", "--dtypes", "fp32", "--modes", "fwd", "--no-peers", "--repeats", "1",
            "--floor", "--json", str(json_path), "--plot", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "GEMM floor" in out
    saved = json.loads(json_path.read_text())
    assert saved["runs"] and saved["gemm_floor"][0]["ratio"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    again = tmp_path / "again.png"
    assert main(["bench", "--plot", str(again), "--from", str(json_path)]) == 0
    assert again.read_bytes()[:4] == b"\x89PNG"


def test_compare_without_matplotlib_fails_before_training(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    code, out = _exit_code(["compare", "--steps", "1"], capsys)
    assert code == 2 and "pip install 'moebal[plot]', or pass --no-plots" in out.err
    assert "corpus:" not in out.err  # nothing was trained


# --- compare --out: checked before training, written atomically -------------------------------

_TINY_COMPARE = [
    "compare", "--steps", "2", "--policies", "aux-1e-3", "--layers", "1", "--d-model", "16", "--heads", "2",
    "--experts", "4", "--expert-hidden", "8", "--batch", "2", "--seq-len", "16", "--val-tokens", "64",
]


def _unwritable_directory(tmp_path):
    """An existing directory this process cannot create files in (root ignores chmod), or None."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    for candidate in (locked, "/sys", "/proc"):
        try:
            with open(f"{candidate}/.moebal-probe", "xb"):
                pass
        except OSError:
            return str(candidate)
        os.unlink(f"{candidate}/.moebal-probe")
    return None


@pytest.mark.parametrize("case", ["existing file", "below a file", "unwritable directory"])
def test_compare_out_that_cannot_hold_results_fails_before_training(case, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    if case == "existing file":
        out = str(a_file)
    elif case == "below a file":
        out = str(a_file / "run")
    else:
        out = _unwritable_directory(tmp_path)
        if out is None:
            pytest.skip("no unwritable directory on this machine")
    code, streams = _exit_code(_TINY_COMPARE + ["--out", out, "--no-plots"], capsys)
    assert code == 2
    error_lines = [line for line in streams.err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "argument --out" in error_lines[0] and out in error_lines[0]
    assert "Traceback" not in streams.err
    assert "corpus:" not in streams.err and streams.out == ""  # nothing was trained
    assert a_file.read_text() == "keep me"


def test_compare_prints_the_table_and_keeps_results_json_when_a_plot_cannot_be_written(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    (out / "maxvio_batch.png").mkdir(parents=True)  # a directory where the plot should go: the write fails
    code = main(_TINY_COMPARE + ["--out", str(out)])
    streams = capsys.readouterr()
    assert code == 1
    assert streams.out.splitlines()[0].startswith("policy") and "aux-1e-3" in streams.out  # the table
    saved = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in saved["policies"]] == ["aux-1e-3"]
    error_lines = [line for line in streams.err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "maxvio_batch.png" in error_lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["maxvio_batch.png", "report.md", "results.json"]  # no temp files
    assert (out / "maxvio_batch.png").is_dir()


def test_compare_replaces_results_atomically(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    out.mkdir()
    names = ("results.json", "maxvio_batch.png", "load_heatmap.png", "frontier.png", "report.md")
    for name in names:
        (out / name).write_text("old " + name)
    readers = {name: open(out / name) for name in names}  # noqa: SIM115 (closed below)
    try:
        assert main(_TINY_COMPARE + ["--out", str(out)]) == 0
        # each file was replaced by a rename: a reader of the old file still sees it whole
        for name, reader in readers.items():
            assert reader.read() == "old " + name
    finally:
        for reader in readers.values():
            reader.close()
    assert json.loads((out / "results.json").read_text())["policies"][0]["name"] == "aux-1e-3"
    for name in names[1:-1]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text().startswith("# moebal compare")
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    mode = (out / "results.json").stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # as an ordinary open() would have created it


# --- MOEBAL_BACKEND: a forced backend that cannot run is named, in info, compare and the forward ---------

def _without_triton(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))


@pytest.mark.parametrize("triton_missing", [False, True])
def test_info_warns_when_moebal_backend_forces_triton_that_cannot_run(triton_missing, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("MOEBAL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if triton_missing:
        _without_triton(monkeypatch)
    elif importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here")
    assert main(["info", "--device", "cpu"]) == 0
    streams = capsys.readouterr()
    warnings = [line for line in streams.err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "MOEBAL_BACKEND=triton" in warnings[0]
    if triton_missing:
        assert "triton is not installed" in warnings[0]
    else:
        assert "CUDA" in warnings[0] and "TRITON_INTERPRET=1" in warnings[0]
    assert "torch" in streams.out  # the report itself is still printed


@pytest.mark.parametrize("env", [{"MOEBAL_BACKEND": "torch"}, {"MOEBAL_BACKEND": "auto"},
                                 {"MOEBAL_BACKEND": "triton", "TRITON_INTERPRET": "1"}])
def test_info_is_silent_when_the_forced_backend_can_run(env, monkeypatch, capsys):
    import importlib.util

    if env["MOEBAL_BACKEND"] == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["info", "--device", "cpu"]) == 0
    streams = capsys.readouterr()
    assert streams.err == "" and f"backend 'auto'  {env['MOEBAL_BACKEND'].replace('auto', 'torch')}" in streams.out


def test_info_names_a_bad_moebal_backend_value(monkeypatch, capsys):
    monkeypatch.setenv("MOEBAL_BACKEND", "cuda")
    assert main(["info", "--device", "cpu"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "MOEBAL_BACKEND" in warnings[0] and "'cuda'" in warnings[0]
    assert all(name in warnings[0] for name in ("'torch'", "'triton'", "'auto'"))


@pytest.mark.parametrize("value, message", [("triton", "MOEBAL_BACKEND=triton"), ("gpu", "MOEBAL_BACKEND must be")])
def test_compare_checks_moebal_backend_before_training(value, message, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("MOEBAL_BACKEND", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    code, streams = _exit_code(_TINY_COMPARE + ["--out", str(tmp_path / "run"), "--no-plots"], capsys)
    assert code == 2 and message in streams.err
    assert "corpus:" not in streams.err and "Traceback" not in streams.err


@pytest.mark.parametrize("triton_missing", [False, True])
def test_forward_error_names_moebal_backend_not_an_argument_never_passed(triton_missing, monkeypatch):
    import moebal

    monkeypatch.setenv("MOEBAL_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if triton_missing:
        _without_triton(monkeypatch)
    layer = moebal.MoE(8, 8, num_experts=4, top_k=2)  # backend="auto"
    with pytest.raises(RuntimeError) as err:
        layer(torch.randn(5, 8))
    text = str(err.value)
    assert "MOEBAL_BACKEND=triton" in text and "backend='triton' was requested" not in text
    assert ("not installed" if triton_missing else "TRITON_INTERPRET=1") in text
    # an explicit request is still named as the argument it was
    monkeypatch.delenv("MOEBAL_BACKEND")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        moebal.MoE(8, 8, num_experts=4, top_k=2, backend="triton")(torch.randn(5, 8))


def test_a_closed_pipe_ends_quietly():
    """``moebal info | head -1``: the reader closes the pipe early; no traceback, exit 0."""
    for reader in ("head -1", "true"):  # reads a line, or none at all
        proc = subprocess.run(["bash", "-c", f"{sys.executable} -m moebal info | {reader}; exit ${{PIPESTATUS[0]}}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
