"""The `l2l-fast` command: meta-train, evaluate, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import NoReturn

from .argtypes import positive_int

DEFAULT_TASK = "quadratic"


def _user_errors() -> tuple:
    from .files import CheckpointError
    from .meta.distributed import DistributedError

    # OSError covers missing files and datasets; DistributedError a dead or hanging rank, or ranks that disagree
    return (OSError, ValueError, CheckpointError, DistributedError)


def _add_threads_arg(parser) -> None:
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch threads (default: torch's); small problems run fastest on 1")


def _apply_threads(args) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _task_flags() -> dict:
    """{option name: [(task spec, its option)]} over the registered tasks, in their order: one flag per name."""
    from .tasks import TASKS

    flags: dict = {}
    for spec in TASKS.values():
        for option in spec.options:
            flags.setdefault(option.name, []).append((spec, option))
    return flags


def _add_task_args(parser) -> None:
    """--task (the registered tasks), one flag per task option, --data-dir."""
    from .tasks import TASKS

    parser.add_argument("--task", choices=list(TASKS), default=DEFAULT_TASK, help="the optimizees")
    for name, declared in _task_flags().items():
        option = declared[0][1]
        if len({(o.type, o.nargs, None if o.choices is None else tuple(o.choices)) for _, o in declared}) > 1:
            raise TypeError(f"tasks {[spec.name for spec, _ in declared]} declare {option.flag} with different "
                            "types, nargs or choices: one flag cannot serve them")
        defaults = [o.default for _, o in declared]
        shared = all(d == defaults[0] for d in defaults)
        where = "; ".join(f"with --task {spec.name}" + ("" if shared else f": default {_words(o.default)}")
                          for spec, o in declared)
        parser.add_argument(option.flag, dest=name, type=option.type, nargs=option.nargs, choices=option.choices,
                            default=option.default if shared else None, action=_GivenTaskOption,
                            help=f"{option.help} ({where})".replace("%", "%%"))
    parser.add_argument("--data-dir", default=None, help="dataset folder (default: $L2L_FAST_DATA, then a cache)")


class _GivenTaskOption(argparse._StoreAction):
    """Stores a task option and notes that the command line gave it: _task_of refuses one that --task does not
    take (its default is not None for every task, so the value alone cannot tell)."""

    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        namespace.given_task_options = [*getattr(namespace, "given_task_options", []), self.dest]


def _words(value) -> str:
    """A value as the command line spells it: a sequence as its words."""
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _task_of(args):
    """(the spec of --task, its options from the command line: defaults for those not given)."""
    from .tasks import get_task

    spec = get_task(args.task)
    own = {o.name for o in spec.options}
    for name in getattr(args, "given_task_options", []):
        if name not in own:  # it would be ignored: the run would not be the one asked for
            declared = _task_flags()[name]
            raise ValueError(f"{declared[0][1].flag}: not an option of --task {spec.name} (it is one of --task "
                             f"{', '.join(task.name for task, _ in declared)})")
    return spec, spec.complete({o.name: getattr(args, o.name, None) for o in spec.options})


def _add_config_args(parser) -> None:
    """One flag per field of MetaTrainConfig that has one, from the field's metadata (meta/config.py)."""
    from .meta.config import flag_fields, flag_type

    for f in flag_fields():
        if isinstance(f.default, bool):  # a switch: on when given
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action="store_true",
                                help=f.metadata["help"].replace("%", "%%"))
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=f.default, type=flag_type(f),
                            choices=f.metadata["choices"], metavar=f.metadata["metavar"],
                            nargs=f.metadata.get("nargs"), help=f.metadata["help"].replace("%", "%%"))


def _config_from_args(args):
    """The MetaTrainConfig of a parsed meta-train command line."""
    from .meta.config import MetaTrainConfig, flag_fields

    _, options = _task_of(args)  # where the data lies (--data-dir) is not part of the run's identity
    flags = {f.name: getattr(args, f.name) for f in flag_fields()}
    return MetaTrainConfig(task=args.task, task_kwargs=options, **flags)


def cmd_meta_train(args) -> int:
    from .meta.distributed import init_from_env
    from .meta.train import MetaTrainer
    from .pretrained import save_pretrained

    config = _config_from_args(args)
    # under torchrun: this rank joins the others (gloo); a plain command: one process, nothing exchanged
    ranks = init_from_env(args.dist_timeout)
    if args.export and ranks.writer:  # found out now, not after the run
        Path(args.export).parent.mkdir(parents=True, exist_ok=True)
    trainer = MetaTrainer(config, args.out, resume=args.resume, progress=not args.no_progress,
                          data_dir=args.data_dir, ranks=ranks)
    summary = trainer.run()
    ranks.close()
    if not ranks.writer:
        return 0
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))
    if args.export:
        net = trainer.best_net()
        record = {"command": " ".join(["l2l-fast"] + sys.argv[1:]), "epochs": summary["epochs"], "seed": args.seed,
                  "validation_score": summary["best_score"], "config": summary["config"]}
        save_pretrained(net, args.export, record)
        print(f"best optimizer written to {args.export}")
    return 0


def load_optimizer_spec(spec: str, task=None, steps: int | None = None):
    """'pretrained:NAME', a path to a weight file, or a baseline name ('adam', 'sgd', 'nag', 'rmsprop').

    With the task, a file holding one LSTM per parameter group (a cifar10 run) loads for its groups. With the
    run's steps, a shipped name with a short-run member loads the weights for that horizon (pretrained.for_horizon,
    as LearnedOptimizer(total_steps=steps) does); the net's `.record` tells which."""
    from .meta.evaluate import BASELINES
    from .pretrained import PATH_SUFFIXES, available, for_horizon, load_pretrained, names_a_file

    if spec in BASELINES:
        return spec, None
    # load_pretrained also takes a bare shipped name; anything else that names no file gets the CLI's choices
    if not spec.startswith("pretrained:") and not names_a_file(spec) and spec not in available():
        raise ValueError(f"--optimizer {spec!r}: expected one of {', '.join(sorted(BASELINES))}, "
                         f"pretrained:NAME (NAME one of {', '.join(available())}) or a path to a weight file "
                         f"({', '.join(PATH_SUFFIXES)})")
    chosen = for_horizon(spec, steps)
    shape = task.sample(1, seed=0, split="val") if task is not None else None
    if shape is None or len(shape.groups) < 2:
        return spec, load_pretrained(chosen)
    return spec, load_pretrained(chosen, groups=shape.groups, dim=shape.dim)


def _say_short_run_members(specs, steps: int | None) -> None:
    """One line per shipped name with a short-run member, so that no table hides which weights ran: those of a
    run of `steps` steps, or (None: a suite) which entries run which."""
    from .pretrained import for_horizon, short_run_member

    for spec in dict.fromkeys(specs):
        if (entry := short_run_member(spec)) is not None:
            name, (longest, member) = spec.removeprefix("pretrained:"), entry
            what = (f"entries of at most {longest} steps run {member!r}, the others {name!r}" if steps is None else
                    f"{steps} steps run {for_horizon(name, steps)!r} (runs of at most {longest} steps: {member!r})")
            print(f"{spec}: {what}", file=sys.stderr)


# evaluate's defaults for one task; its parser leaves them None so that --suite can tell which were given
EVALUATE_DEFAULTS = {"steps": 100, "problems": 10, "tune_problems": 10}


def cmd_evaluate(args) -> int:
    from .meta.evaluate import compare, final_ratios, markdown_table, plot_curves, tune_learning_rate

    if getattr(args, "suite", None):
        return _evaluate_suite(args)
    for flag in ("quick", "reuse_tuning"):
        if getattr(args, flag, None):
            raise ValueError(f"--{flag.replace('_', '-')}: applies to --suite only")
    args = argparse.Namespace(**{**vars(args), "task": args.task or DEFAULT_TASK, **{
        name: default if getattr(args, name, None) is None else getattr(args, name)
        for name, default in EVALUATE_DEFAULTS.items()}})
    task_spec, options = _task_of(args)
    task = task_spec.make(options, data_dir=args.data_dir)
    # Every spec is resolved before any baseline is tuned, so a bad one fails at once.
    loaded = [load_optimizer_spec(spec, task, args.steps) for spec in args.optimizer]
    _say_short_run_members(args.optimizer, args.steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # now, not after the run: an --out that is a file fails at once
    learned = {label: net for label, net in loaded if net is not None}
    tuned = {label: tune_learning_rate(label, task, args.steps, args.tune_problems, seed=args.seed)[0]
             for label, net in loaded if net is None}
    curves = compare(task, learned, args.steps, args.problems, seed=args.seed, tuned_lrs=tuned)
    ratios = final_ratios(curves)  # to tuned Adam, when it is among them
    table = markdown_table(curves, f"step {args.steps}", ratios)
    print(table)
    labels = [_words(options[o.name]).replace(" ", "x") for o in task_spec.options if o.label]  # mnist_20x20_relu
    stem = "_".join([args.task, *labels, f"{args.steps}steps"])
    plot_curves(curves, out / f"{stem}.png", f"{stem.replace('_', ' ')} ({args.problems} held-out problems)")
    (out / f"{stem}.md").write_text(table + "\n")
    rows = [c.row() for c in curves]
    if ratios:
        for row in rows:
            row["final_vs_adam"] = dict(zip(("ratio", "ci95_low", "ci95_high"), ratios[row["optimizer"]]))
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    print(f"plot: {out / f'{stem}.png'}")
    return 0


def _evaluate_suite(args) -> int:
    """evaluate --suite NAME: every entry of the suite, each --optimizer against Adam 1e-3 and tuned Adam."""
    from .meta.evaluate import BASELINES
    from .meta.suite import run_suite
    from .meta.suite_report import write_report

    given = [flag for flag, value in [("--task", args.task), ("--steps", args.steps)] if value is not None]
    given += ["--" + name.replace("_", "-") for name in _task_flags() if getattr(args, name, None) is not None]
    if given:
        raise ValueError(f"--suite {args.suite}: its entries set their tasks, options and horizons; "
                         f"{', '.join(given)} apply to a single --task")
    started = time.perf_counter()
    specs = list(dict.fromkeys(args.optimizer))
    _say_short_run_members(specs, None)
    # loaded for each entry (a file with one LSTM per parameter group loads for its groups, a shipped name with a
    # short-run member for the entry's horizon), all before any run
    learned = {spec: lambda task, steps, spec=spec: load_optimizer_spec(spec, task, steps)[1] for spec in specs
               if spec not in BASELINES}
    baselines = [spec for spec in specs if spec in BASELINES]
    Path(args.out).mkdir(parents=True, exist_ok=True)  # now, not after the suite's half hour
    cache = {}
    if args.reuse_tuning:
        from .meta.suite_report import tuning_cache_from_record

        cache = tuning_cache_from_record(json.loads(Path(args.reuse_tuning).read_text()))
    result = run_suite(args.suite, learned, baselines=baselines, problems=args.problems,
                       tune_problems=args.tune_problems, seed=args.seed, quick=args.quick, data_dir=args.data_dir,
                       cache=cache, log=lambda line: print(line, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - started
    import torch

    from .pretrained import short_run_member

    members = {spec: dict(zip(("longest_run", "member"), entry)) for spec in specs
               if (entry := short_run_member(spec)) is not None}
    paths = write_report(result, args.out, {"optimizers": specs, "wall_seconds": round(seconds, 1),
                                            "threads": torch.get_num_threads(), "short_run_members": members})
    print(paths["md"].read_text(), end="")
    print(f"suite {args.suite}: {len(result.entries)} tasks in {seconds:.0f} s; table {paths['md']}, "
          f"rows {paths['json']}, plot {paths['png']}")
    return 0


def cmd_demo(args) -> int:
    """MNIST MLPs with the shipped optimizers (the default `general` and the task's specialist) against tuned
    baselines; quadratics if MNIST is missing."""
    from .data.mnist import MNISTUnavailable, load_mnist

    task = "mnist"
    try:
        load_mnist("train", data_dir=args.data_dir)
    except MNISTUnavailable as error:
        print(f"{error}\nFalling back to the quadratic task.")
        task = "quadratic"
    started = time.perf_counter()
    # the task's options are left out: each takes its default
    ns = argparse.Namespace(threads=args.threads, task=task, data_dir=args.data_dir, steps=args.steps,
                            problems=args.problems, tune_problems=args.problems, seed=args.seed, out=args.out,
                            optimizer=["pretrained:general", f"pretrained:{task}", "adam", "rmsprop", "nag", "sgd"])
    code = cmd_evaluate(ns)
    print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return code


def meta_train_flags_markdown() -> str:
    """The flags of `l2l-fast meta-train` as a markdown table (flag, default, meaning), from its parser: what
    README.md shows between its "meta-train flags" markers."""
    _, commands = _build_parser()
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in commands["meta-train"]._actions:  # argparse keeps no public list of a parser's options
        if action.dest == "help":
            continue
        flag = action.option_strings[-1]
        if action.nargs != 0:
            word = action.metavar or ("{" + ",".join(map(str, action.choices)) + "}" if action.choices
                                      else action.dest.upper())
            flag += f" {word}" + (f" [{word} ...]" if action.nargs == "+" else "")
        shown = "" if action.default is None or action.nargs == 0 else "`" + (_words(action.default) or '""') + "`"
        meaning = (action.help or "").replace("%%", "%").replace("|", "\\|")
        rows.append(f"| `{flag}` | {shown} | {meaning} |")
    return "\n".join(rows)


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The command's parser and its subcommands' parsers by name (built anew: the task registry may have grown)."""
    from .meta.suite import SUITES

    parser = argparse.ArgumentParser(prog="l2l-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("meta-train", help="meta-train an LSTM optimizer")
    _add_task_args(train)
    _add_config_args(train)
    train.add_argument("--out", default="runs/meta-train",
                       help="the run's directory: checkpoint.pt, best.pt, log.csv, summary.json")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--export", default=None, help="write the best optimizer to this .pt file")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                       help="under torchrun: seconds after which the ranks give up on one that died or hangs "
                            "(default: $L2L_FAST_DIST_TIMEOUT, else 300)")
    train.set_defaults(func=cmd_meta_train)

    evaluate = sub.add_parser("evaluate", help="compare optimizers on held-out problems")
    _add_task_args(evaluate)
    evaluate.add_argument("--optimizer", action="append", required=True,
                          help="pretrained:NAME, a .pt file (exported, or a meta-train run's best.pt / checkpoint.pt), "
                               "adam, rmsprop, nag or sgd (repeat the option)")
    evaluate.add_argument("--steps", type=positive_int, default=None, help="(default 100; not with --suite)")
    evaluate.add_argument("--problems", type=positive_int, default=None,
                          help="held-out test problems (default 10; --suite: 8, --quick: 3)")
    evaluate.add_argument("--tune-problems", type=positive_int, default=None,
                          help="validation problems for the lr grid (default 10; --suite: 8, --quick: 2)")
    evaluate.add_argument("--seed", type=int, default=1,
                          help="seed of the sampled problems (default 1)")
    evaluate.add_argument("--out", default="runs/evaluate", help="directory for the table (.md, .json) and the plot")
    evaluate.add_argument("--suite", choices=list(SUITES), default=None,
                          help="a declared list of held-out tasks and horizons (l2l_fast/meta/suite.py) instead of "
                               "--task: each --optimizer against Adam at lr 1e-3 and tuned Adam, with divergence "
                               "counts and a summary; writes suite_NAME.md, .json and .png into --out")
    evaluate.add_argument("--quick", action="store_true",
                          help="with --suite: 3 test and 2 validation problems, horizons cut to 20 steps")
    evaluate.add_argument("--reuse-tuning", default=None, metavar="JSON",
                          help="with --suite: take the baselines' tuned learning rates from an earlier run's "
                               "suite_NAME.json where its tuning settings match (entries that do not match tune "
                               "anew): a new learned optimizer is compared without tuning Adam again")
    # --task and its options left None, so that --suite can refuse them; a single-task run fills in the defaults
    evaluate.set_defaults(func=cmd_evaluate, task=None, **{name: None for name in _task_flags()})

    demo = sub.add_parser("demo", help="the shipped general and MNIST optimizers against tuned Adam, RMSprop, "
                                            "NAG, SGD")
    demo.add_argument("--data-dir", default=os.environ.get("L2L_FAST_DATA"),
                      help="where MNIST is (default: $L2L_FAST_DATA, then a cache it downloads into)")
    demo.add_argument("--steps", type=positive_int, default=100, help="steps of each training run (default 100)")
    demo.add_argument("--problems", type=positive_int, default=10,
                      help="test problems, and as many validation problems to tune each baseline's lr (default 10)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the problems (default 1)")
    demo.add_argument("--out", default="runs/demo", help="directory for the table and the loss-curve plot")
    demo.set_defaults(func=cmd_demo)

    for command in (train, evaluate, demo):
        _add_threads_arg(command)
    return parser, {"meta-train": train, "evaluate": evaluate, "demo": demo}


def main(argv=None) -> int:
    parser, _ = _build_parser()
    args = parser.parse_args(argv)
    _apply_threads(args)
    try:
        return args.func(args)
    except _user_errors() as error:
        # What a user can fix (a missing file or dataset, a torn checkpoint, a bad value) gets its message,
        # not a traceback; L2L_FAST_TRACEBACK=1 shows the traceback too.
        if os.environ.get("L2L_FAST_TRACEBACK"):
            raise
        parser.exit(2, f"l2l-fast {args.command}: error: {error}\n")


def entry() -> NoReturn:
    """The `l2l-fast` process (its console script, `python -m l2l_fast.cli`, torchrun's workers): main(), then
    exit. Under a launcher (WORLD_SIZE > 1) a command that succeeded leaves through end_process, without
    finalizing the interpreter, where gloo's leftover threads could abort a rank whose run ended well
    (l2l_fast/meta/distributed.py, "Exit"). A failure leaves as always, with its own non-zero status."""
    from .meta.distributed import end_process, launched_world_size

    code = main()
    if code == 0 and launched_world_size() > 1:
        end_process(0)
    sys.exit(code)


if __name__ == "__main__":
    entry()
