"""The `fastdraft` command line: one subcommand per stage, each taking a recipe and `--set` overrides.

    fastdraft demo [--quick]                       # the whole chain on the embedded default, offline
    fastdraft run RECIPE [--from STAGE]            # the whole chain for any recipe
    fastdraft prepare|pretrain|generate|distill|evaluate|serve RECIPE [--set key.sub=value ...]
    fastdraft make-draft --target PATH_OR_ID --params 50M --out DIR
    fastdraft check-pair TARGET DRAFT
    fastdraft plan RECIPE [--set ...]              # what runs where, each worker's peak memory, and whether it fits
    fastdraft export RUN_OR_DRAFT --format openvino|hf|gguf [--weights int8|int4|q8_0|f16|f32] --out DIR

User errors (bad recipe, missing path, tokenizer mismatch) print one sentence and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from fastdraft.errors import FastdraftError, StageNotBuiltError

# stage -> "module:function"; each function takes (recipe, **options) and returns a summary dict.
STAGES = {
    "prepare": "fastdraft.data.pipeline:run_prepare",
    "pretrain": "fastdraft.training.pretrain:run_pretrain",
    "generate": "fastdraft.generation.pipeline:run_generate",
    "distill": "fastdraft.training.distill:run_distill",
    "evaluate": "fastdraft.evaluation.pipeline:run_evaluate",
    "serve": "fastdraft.serving.app:run_serve",
    "run": "fastdraft.pipeline:run_pipeline",
    "demo": "fastdraft.pipeline:run_demo",
}
STAGE_HELP = {
    "prepare": "stream corpora through Ray Data: tokenize with the target's tokenizer, mix, pack, shard",
    "pretrain": "pre-train the draft (PT, then CP) with Ray Train",
    "generate": "generate the alignment set: the target answers prompts on Ray Data actors",
    "distill": "align the draft to the target on its own answers (sequence-level KD)",
    "evaluate": "measure acceptance, tau, MBSU and wall-clock speedup; write the report",
    "serve": "serve the target+draft pair with speculative decoding over HTTP (Ray Serve)",
}


def resolve_stage(name: str):
    """Import a stage's entry function, or raise StageNotBuiltError if its module has not landed."""
    module, func = STAGES[name].split(":")
    try:
        return getattr(importlib.import_module(module), func)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise StageNotBuiltError(f"stage '{name}' is not built yet ({module} does not exist)") from None
        raise
    except AttributeError:
        raise StageNotBuiltError(f"stage '{name}' is not built yet ({module}.{func} does not exist)") from None


def demo_recipe_path() -> Path:
    """The demo recipe of the checkout fastdraft is installed from (recipes are data files, not a package)."""
    path = Path(__file__).resolve().parent.parent / "jobs" / "recipes" / "demo.yaml"
    if not path.is_file():
        raise FastdraftError(f"the demo recipe is not at {path}: `fastdraft demo` runs from a checkout "
                             f"(git clone, then pip install -e .)")
    return path


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe YAML (see jobs/recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set pretrain.optim.lr=3e-4 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdraft", description="Train a vocabulary-compatible draft for any LLM and serve the pair with speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="run the whole chain on the embedded default target, offline")
    p.add_argument("--quick", action="store_true", help="a ~5-minute smoke run at reduced size")
    p.add_argument("--workdir", default=None, help="where to write (default: runs/demo or runs/demo-quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    p = sub.add_parser("run", help="run prepare -> pretrain -> generate -> distill -> evaluate for a recipe")
    _add_recipe_args(p)
    p.add_argument("--from", dest="from_stage", default=None, choices=["prepare", "pretrain", "generate", "distill", "evaluate"],
                   help="rerun from this stage even if its outputs exist")

    for name, text in STAGE_HELP.items():
        _add_recipe_args(sub.add_parser(name, help=text))

    p = sub.add_parser("make-draft", help="build an untrained draft in the target's family and vocabulary")
    p.add_argument("--target", required=True, help="target model directory, or embedded:smollm2-135m-instruct")
    p.add_argument("--params", default=None, help="parameter budget, e.g. 50M")
    p.add_argument("--layers", type=int, default=None, help="number of layers (overrides the budget's choice)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (overrides the budget's choice)")
    p.add_argument("--init", choices=("scratch", "target"), default="scratch",
                   help="scratch: random weights in a scaled-down shape; target: the target's first --layers layers")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("plan", help="what each stage runs where and each worker's peak memory, against the cluster")
    _add_recipe_args(p)

    p = sub.add_parser("check-pair", help="check that a target and a draft share the exact tokenizer")
    p.add_argument("target")
    p.add_argument("draft")

    p = sub.add_parser("export", help="write a draft in an engine's format (hf, openvino, gguf) and check it against its source")
    p.add_argument("source", metavar="RUN_OR_DRAFT", help="a draft directory, a recipe (its final draft) or a run's workdir")
    p.add_argument("--format", dest="fmt", required=True, help="hf (transformers assistant_model), openvino (GenAI draft_model), gguf (llama.cpp -md)")
    p.add_argument("--weights", default=None, help="openvino: int8 (default), int4, f16, f32; hf: f32 (default), f16; gguf: q8_0 (default), f16, f32")
    p.add_argument("--out", required=True, help="export folder (new, empty, or a previous export, replaced once the new one is checked)")
    p.add_argument("--target", default=None, help="the target to check against (default: the one the draft was made for)")
    p.add_argument("--with-target", action="store_true", help="openvino, gguf: export the target too, for a deployable pair")
    p.add_argument("--prompts", type=int, default=8, help="check: built-in instruction prompts")
    p.add_argument("--max-new-tokens", type=int, default=64, help="check: new tokens per prompt")
    p.add_argument("--gamma", type=int, default=4, help="check: draft tokens per round")
    p.add_argument("--threads", type=int, default=0, help="check: OpenVINO inference threads (0: the plugin's default)")
    return parser


def _print_summary(summary) -> None:
    if isinstance(summary, dict):
        for key, value in summary.items():
            print(f"  {key}: {value}")


def run_command(args: argparse.Namespace) -> int:
    from fastdraft.config import load_recipe, parse_count

    if args.command == "make-draft":
        from fastdraft.models import make_draft

        try:
            params = parse_count(args.params) if args.params else None
        except ValueError as exc:
            raise FastdraftError(f"--params: {exc}") from None
        out, summary = make_draft(args.target, args.out, params=params, layers=args.layers, hidden=args.hidden, seed=args.seed,
                                   init=args.init)
        print(summary)
        print(f"saved to {out}")
        return 0
    if args.command == "check-pair":
        from fastdraft.tokenizer import check_compatible

        print(check_compatible(args.target, args.draft))
        return 0
    if args.command == "export":
        from fastdraft.export import CheckSettings, check_table, export_draft

        result = export_draft(args.source, args.fmt, args.out, args.weights, args.target, args.with_target,
                              CheckSettings(args.prompts, args.max_new_tokens, args.gamma, args.threads))
        print(check_table(result.rows))
        print(f"exported to {result.out} (check: {result.out / 'export.json'}, card: {result.out / 'README.md'})")
        if not result.passed:  # the folder is kept, to look into; the exit code says the check failed
            print("fastdraft export: error: speculative greedy output differs from the target's own (see the table)",
                  file=sys.stderr)
            return 1
        return 0
    if args.command == "plan":
        from fastdraft.plan import format_plan, plan

        plans = plan(load_recipe(args.recipe, args.overrides))
        print(format_plan(plans))
        bad = [p.stage for p in plans if not p.fits]
        if bad:
            raise FastdraftError(f"{', '.join(bad)} would not fit the memory offered (see above for what to lower)")
        return 0
    if args.command == "demo":
        _print_summary(resolve_stage("demo")(quick=args.quick, workdir=args.workdir, overrides=args.overrides))
        return 0
    fn = resolve_stage(args.command)  # before loading the recipe: an unbuilt stage says so first
    recipe = load_recipe(args.recipe, args.overrides)
    kwargs = {"from_stage": args.from_stage} if args.command == "run" else {}
    _print_summary(fn(recipe, **kwargs))
    return 0


def stage_main(stage: str, argv: list[str]) -> int:
    """Entry point of `jobs/<stage>.py`: the same as `fastdraft <stage> RECIPE --set ...`."""
    return main([stage, *argv])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except FastdraftError as exc:
        print(f"fastdraft {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastdraft {args.command}: interrupted (completed work is kept; re-run to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
