"""The ``moebal`` command: ``compare`` (the main job), ``bench`` and ``info``.

``moebal compare`` trains one small byte-level MoE language model per balancing policy
on the interpreter's own standard-library sources and prints a table of validation bits
per byte and load balance; ``moebal bench`` times the MoE layer against its dense
equivalent; ``moebal info`` says what moebal will run on here.

Progress goes to stderr, results to stdout. Bad options exit with status 2 and a message
(``compare`` checks ``--out`` before it trains); a file that cannot be written after training
is one error line and status 1, after the table has been printed.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

from moebal.cli_info import backend_env_problem, add_info

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _policies(text: str):
    from moebal.compare.policies import parse_policies

    try:
        return parse_policies(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _device(text: str) -> str:
    from moebal.compare.train import check_device

    try:
        return check_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        items = tuple(part.strip() for part in text.split(",") if part.strip())
        bad = [item for item in items if item not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(allowed)}; got {text!r}")
        return items

    return parse


LONG_STEPS = 2000  # --preset long


def _add_compare(sub) -> None:
    from moebal.compare.model import ModelConfig
    from moebal.compare.policies import DEFAULT_POLICIES, NAMES_HELP
    from moebal.compare.train import CompareConfig

    c, m = CompareConfig(), ModelConfig()
    p = sub.add_parser(
        "compare",
        help="train one small MoE model per balancing policy and compare loss and balance",
        description=(
            "Train one small byte-level MoE language model per balancing policy on the standard-library "
            "sources of this Python (no downloads; same init and data order for every policy) and report "
            "validation bits per byte, MaxVio_global (validation), MaxVio_train and MaxVio_batch (training), "
            "dropped tokens and tokens/s. Writes results.json, maxvio_batch.png and load_heatmap.png to --out."
        ),
    )
    p.add_argument("--policies", type=_policies, default=",".join(DEFAULT_POLICIES),
                   help=f"comma list of policies (default: %(default)s); names: {NAMES_HELP}")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"training steps per policy (default: {c.steps}; {LONG_STEPS} with --preset long)")
    p.add_argument("--preset", choices=("default", "long"), default="default",
                   help=f"'long': {LONG_STEPS} steps, long enough for the loss-free paper's u = 1e-3 "
                        "(about 25 minutes for the default policies on one thread)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu or cuda (default: %(default)s)")
    p.add_argument("--out", default=None,
                   help="output directory (default: ./moebal-compare; with --plot, the JSON's directory)")
    p.add_argument("--seed", type=int, default=c.seed, help="init and data-order seed (default: %(default)s)")
    p.add_argument("--seeds", type=_positive_int, default=1,
                   help="run every policy with N seeds (--seed, --seed+1, ...); the table shows mean ± sd and "
                        "which policies the seeds cannot tell apart (default: %(default)s)")
    p.add_argument("--plot", metavar="RESULTS_JSON", default=None,
                   help="train nothing: print the table of a saved results.json and redraw its plots (into --out "
                        "when given, else next to the JSON)")
    p.add_argument("--batch", type=_positive_int, default=c.batch, help="sequences per step (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=c.seq_len, help="bytes per sequence (default: %(default)s)")
    p.add_argument("--lr", type=_positive_float, default=c.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--val-tokens", type=_positive_int, default=c.val_tokens,
                   help="validation bytes to evaluate (default: %(default)s)")
    p.add_argument("--log-every", type=_positive_int, default=c.log_every,
                   help="progress line every N steps on stderr (default: %(default)s)")
    p.add_argument("--layers", type=_positive_int, default=m.layers, help="transformer blocks (default: %(default)s)")
    p.add_argument("--d-model", type=_positive_int, default=m.d_model, help="model width (default: %(default)s)")
    p.add_argument("--heads", type=_positive_int, default=m.heads, help="attention heads (default: %(default)s)")
    p.add_argument("--experts", type=_positive_int, default=m.num_experts,
                   help="experts per layer (default: %(default)s)")
    p.add_argument("--expert-hidden", type=_positive_int, default=m.expert_hidden,
                   help="hidden width of each expert (default: %(default)s)")
    p.add_argument("--top-k", type=_positive_int, default=m.top_k, help="experts per token (default: %(default)s)")
    p.add_argument("--capacity-factor", type=_positive_float, default=None,
                   help="expert capacity factor; default: dropless, as in the loss-free paper")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="CPU threads for torch (default: %(default)s, which gives the same numbers on any machine "
                        "and stays fast when other jobs share the cores)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (results.json and the table only)")
    p.set_defaults(run=_run_compare, parser=p)


def _redraw(args, parser) -> int:
    """``moebal compare --plot results.json``: the table and the plots from a saved run."""
    from pathlib import Path

    from moebal.compare.report import PLOTS, check_out_dir, format_table, reading, write_report

    path = Path(args.plot)
    try:
        results = json.loads(path.read_text())
        table = format_table(results)
    except OSError as err:
        parser.error(f"argument --plot: cannot read {path}: {err.strerror or err}")
    except (ValueError, KeyError, TypeError) as err:
        parser.error(f"argument --plot: {path} is not a moebal compare results.json ({type(err).__name__}: {err})")
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("the plots need matplotlib: pip install 'moebal[plot]'")
    try:
        out_dir = check_out_dir(args.out if args.out is not None else path.parent)
    except ValueError as err:
        parser.error(f"argument --out: {err}")
    print(table, flush=True)
    try:
        print("\n" + reading(results), flush=True)
    except (KeyError, TypeError, ValueError):
        pass  # an older results.json: the table is all there is to print
    written = []
    try:
        written.append(write_report(results, out_dir / "report.md"))
    except (OSError, KeyError, TypeError, ValueError) as err:
        print(f"moebal compare: error: could not write report.md from {path}: {err}", file=sys.stderr)
        return 1
    for _, name, plot in PLOTS:
        try:
            written.append(plot(results, out_dir / name))
        except (OSError, KeyError, TypeError, ValueError) as err:
            print(f"moebal compare: error: could not draw {name} from {path}: {err}", file=sys.stderr)
            return 1
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def _run_compare(args, parser) -> int:
    from moebal.compare.model import ModelConfig
    from moebal.compare.report import check_out_dir, format_table
    from moebal.compare.train import CompareConfig, run_compare

    if args.plot is not None:
        return _redraw(args, parser)

    try:
        model = ModelConfig(
            layers=args.layers, d_model=args.d_model, heads=args.heads, num_experts=args.experts,
            expert_hidden=args.expert_hidden, top_k=args.top_k, capacity_factor=args.capacity_factor,
            max_seq_len=max(1024, args.seq_len),
        )
        steps = args.steps if args.steps is not None else (LONG_STEPS if args.preset == "long" else CompareConfig().steps)
        cfg = CompareConfig(
            steps=steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, val_tokens=args.val_tokens,
            seed=args.seed, device=args.device, log_every=args.log_every, model=model,
        )
    except ValueError as err:
        parser.error(str(err))
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        parser.error("the plots need matplotlib: pip install 'moebal[plot]', or pass --no-plots")
    problem = backend_env_problem(args.device)
    if problem:
        parser.error(problem)
    try:
        out_dir = check_out_dir(args.out or "moebal-compare")  # before training: minutes of work must not end in a failed write
    except ValueError as err:
        parser.error(f"argument --out: {err}")
    import torch

    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run_compare(cfg, args.policies, progress=progress, seeds=list(range(args.seed, args.seed + args.seeds)))
    finally:
        torch.set_num_threads(threads_before)
    from moebal.compare.report import reading

    print(format_table(results), flush=True)  # first: the table survives any failed write below
    print("\n" + reading(results), flush=True)
    return _write_compare(results, out_dir, plots=not args.no_plots, progress=progress)


def _write_compare(results: dict, out_dir, plots: bool, progress) -> int:
    """results.json, then the plots drawn from it; a failed write is one error line and status 1."""
    from moebal.compare.report import PLOTS, write_report, write_results

    written = []
    target = out_dir / "results.json"
    try:
        written.append(write_results(results, target))
        saved = json.loads(target.read_text())
        target = out_dir / "report.md"
        written.append(write_report(saved, target))
        if plots:
            for _, name, plot in PLOTS:
                target = out_dir / name
                written.append(plot(saved, target))
    except OSError as err:
        if written:
            progress("wrote " + ", ".join(str(p) for p in written))
        progress(f"moebal compare: error: could not write {target}: {err.strerror or err}")
        return 1
    progress("wrote " + ", ".join(str(p) for p in written))
    return 0


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(part.strip() for part in text.split(",") if part.strip())
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma list, got {text!r}")
    return items


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(_positive_int(item) for item in _comma_list(text))


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time the MoE layer against its dense-equivalent FFN (and peers)",
        description=(
            "Time moebal's MoE layer (forward, forward+backward) side by side with the dense SwiGLU FFN of "
            "equal active FLOPs and the peer MoE implementations installed here, at configs A (many small "
            "experts), B (few big experts) and C (small layer). With --plot PNG --from JSON, only draw a "
            "saved result; with --plot PNG --json PATH, run, save, then draw from the saved file."
        ),
    )
    p.add_argument("--configs", type=_comma_list, default=("A", "B", "C"),
                   help="comma list of configs: A, B, C (tiny: a smoke-test shape) (default: A,B,C)")
    p.add_argument("--dtypes", type=_choices(("fp32", "bf16")), default=("fp32", "bf16"),
                   help="comma list among fp32,bf16 (default: fp32,bf16)")
    p.add_argument("--modes", type=_choices(("fwd", "fwd+bwd")), default=("fwd", "fwd+bwd"),
                   help="comma list among fwd,fwd+bwd (default: fwd,fwd+bwd)")
    p.add_argument("--threads", type=_int_list, default=(1,),
                   help="CPU threads; a comma list runs one full pass per count (default: 1)")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed rounds; each implementation keeps its fastest (--decode: the median counts) "
                        "(default: 5, --decode: 15)")
    p.add_argument("--timer", choices=("auto", "cpu", "wall"), default="auto",
                   help="auto: process CPU time with one thread (robust on shared cores), wall time with more")
    p.add_argument("--no-peers", action="store_true", help="skip the peer implementations")
    p.add_argument("--floor", action="store_true",
                   help="also time the per-expert GEMMs alone against the dense FFN's GEMMs (the GEMM floor "
                        "no per-expert-GEMM MoE can beat)")
    p.add_argument("--decode", action="store_true",
                   help="decode-sized batches instead: forward under inference_mode at --tokens, d=1024 f=384 E=64 "
                        "K=8 (--configs tiny: a smoke-test shape), moebal next to HF's eager and grouped_mm experts, "
                        "with the touched expert bytes, GB/s and the fraction of a read bandwidth measured here")
    p.add_argument("--tokens", type=_int_list, default=(1, 8, 64),
                   help="--decode: comma list of batch sizes in tokens (default: 1,8,64)")
    p.add_argument("--json", metavar="PATH", help="write the full result to this JSON file")
    p.add_argument("--plot", metavar="PNG",
                   help="draw a PNG from a saved JSON (--from JSON, or the --json just written)")
    p.add_argument("--from", dest="from_json", metavar="JSON", help="the saved JSON that --plot draws (no run)")
    p.set_defaults(run=_run_bench, parser=p)


def _run_bench(args, parser) -> int:
    if args.from_json and not args.plot:
        parser.error("--from JSON needs --plot PNG")
    if args.plot and not (args.from_json or args.json):
        parser.error("--plot PNG needs --from JSON (plots are drawn from a saved result) or --json PATH")
    try:
        from moebal import bench
    except ImportError as err:
        print(f"moebal bench: the benchmark module is not available ({err})", file=sys.stderr)
        return 1
    if args.from_json:
        bench.plot(args.from_json, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
        return 0
    if args.decode:
        return _run_bench_decode(args, parser, bench)
    unknown = [c for c in args.configs if c not in bench.CONFIGS]
    if unknown:
        parser.error(f"argument --configs: unknown config(s) {', '.join(unknown)}; known: {', '.join(bench.CONFIGS)}")
    threads = args.threads[0] if len(args.threads) == 1 else args.threads
    result = bench.run_layer_bench(
        configs=args.configs, dtypes=args.dtypes, modes=args.modes, threads=threads, peers=not args.no_peers,
        repeats=args.repeats or 5, timer=args.timer, floor=args.floor, progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(bench.format_table(result))
    if args.json:
        bench.save_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
        if args.plot:
            bench.plot(args.json, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def _float_list(text: str) -> tuple[float, ...]:
    out = []
    for item in _comma_list(text):
        try:
            out.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    return tuple(out)


def _add_multitask(sub) -> None:
    from moebal.multitask_bench.run import MODELS, BenchConfig

    c = BenchConfig()
    p = sub.add_parser(
        "multitask",
        help="multi-task MoE benchmark: shared-bottom, MMoE, CGC, PLE, HoME, MMoEEx at equal parameters",
        description=(
            "Train shared-bottom, MMoE, CGC, PLE, HoME and MMoEEx (equal parameter count) on a synthetic "
            "multi-task regression built in code: two dense tasks whose correlation is swept (Ma et al. 2018's "
            "protocol) and a data-sparse task with about 1 % of its labels. Prints per-task test R^2 and the "
            "gate statistics (shared-expert occupancy, own-expert use, dead units), writes results.json, "
            "report.md, quality.png and gate_mass.png to --out. About 4 minutes on 2 cores."
        ),
    )
    p.add_argument("--out", default="moebal-multitask", help="output directory (default: %(default)s)")
    p.add_argument("--models", type=_choices(tuple(MODELS)), default=c.models,
                   help=f"comma list among {','.join(MODELS)} (default: all)")
    p.add_argument("--correlations", type=_float_list, default=c.correlations,
                   help="comma list of dense-task correlations in [-1, 1] (default: 1,0.8,0.5,0)")
    p.add_argument("--seeds", type=_positive_int, default=c.seeds, help="seeds per point (default: %(default)s)")
    p.add_argument("--steps", type=_positive_int, default=c.steps, help="training steps (default: %(default)s)")
    p.add_argument("--train-examples", type=_positive_int, default=c.n_train,
                   help="training examples; the sparse task has 1 %% of them labelled (default: %(default)s)")
    p.add_argument("--threads", type=int, default=c.threads, help="CPU threads, 0 = torch's default (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip the pictures")
    p.set_defaults(run=_run_multitask, parser=p)


def _run_multitask(args, parser) -> int:
    from moebal.multitask_bench.report import check_out_dir, format_tables, reading, write_all
    from moebal.multitask_bench.run import BenchConfig, run_benchmark

    if args.threads < 0:
        parser.error(f"argument --threads: expected an integer >= 0, got {args.threads}")
    try:
        cfg = BenchConfig(correlations=args.correlations, models=args.models, seeds=args.seeds, steps=args.steps,
                          n_train=args.train_examples, threads=args.threads)
    except ValueError as err:
        parser.error(str(err))
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:
        parser.error("the plots need matplotlib: pip install 'moebal[plot]', or pass --no-plots")
    try:
        out_dir = check_out_dir(args.out)
    except ValueError as err:
        parser.error(f"argument --out: {err}")
    results = run_benchmark(cfg, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_tables(results))
    print()
    print(reading(results))
    try:
        paths = write_all(results, out_dir, plots=not args.no_plots)
    except OSError as err:
        print(f"moebal multitask: cannot write results: {err}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _run_bench_decode(args, parser, bench) -> int:
    from moebal.bench import decode

    if args.plot:
        parser.error("--plot draws the training bench; --decode writes its table and --json only")
    configs = tuple(args.configs)
    if configs not in (("A", "B", "C"), ("tiny",)):
        parser.error("--decode runs one shape: leave --configs out (d=1024 f=384 E=64 K=8) or give --configs tiny")
    tiny = configs == ("tiny",)
    result = decode.run_decode_bench(
        tokens=args.tokens, dtypes=args.dtypes, shape=decode.TINY_SHAPE if tiny else decode.DECODE_SHAPE,
        threads=args.threads[0], peers=not args.no_peers, repeats=args.repeats or 15, warmup=1 if tiny else 2,
        timer=args.timer, bandwidth_bytes=(1 << 22) if tiny else (1 << 30),
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(decode.format_decode_table(result))
    if args.json:
        bench.save_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moebal", description="Mixture-of-Experts routing and load balancing for PyTorch."
    )
    sub = parser.add_subparsers(dest="command", metavar="{compare,bench,multitask,info}", required=True)
    _add_compare(sub)
    _add_bench(sub)
    _add_multitask(sub)
    add_info(sub, _device)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args, args.parser)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code
    except BrokenPipeError:  # the reader went away (``moebal info | head``): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0


if __name__ == "__main__":
    sys.exit(main())
