"""The `sae` console script: a thin dispatcher over sae/commands/<name>.py.

Each command module defines HELP (one line), add_arguments(parser) and run(args) -> int | None.
Bad input raises sae.errors.UserError: printed as one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from sae.errors import UserError

COMMANDS = ["collect", "train", "eval", "analyze", "sweep", "export", "dashboard"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump), like every other error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE",
                        help="auto (default: CUDA when present), cpu, cuda, or any torch device such as cuda:1")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: initialisation, batch order and sampling follow from it (default 0)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows (tokens) per step, or windows per forward pass for commands that run the model "
                             "(each command's default suits a CPU)")


# the values sae.lm.loading.parse_model_dtype takes (repeated here so that `sae --help` needs no torch)
MODEL_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


def _model_dtype(text: str) -> str:
    if str(text).strip().lower() not in MODEL_DTYPE_CHOICES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(MODEL_DTYPE_CHOICES)}")
    return str(text).strip().lower()


def add_run_store_arguments(parser, layer_help: str) -> None:
    """--run, --activations, --layer and --allow-incomplete: where a trained SAE meets a store (eval, analyze)."""
    parser.add_argument("--run", required=True,
                        help="run folder (config.json + sae.safetensors; SAELens, sparsify and Gemma Scope folders "
                             "too), or RELEASE:SAE_ID, a published SAE (e.g. gemma-scope-2b-pt-res:layer_12/width_16k/"
                             "average_l0_82; results go beside its cached copy)")
    parser.add_argument("--activations", required=True, metavar="STORE", help="the activation store")
    parser.add_argument("--layer", default=None, help=layer_help)
    add_allow_incomplete_argument(parser)


def add_allow_incomplete_argument(parser) -> None:
    """--allow-incomplete, for the commands that read a run or a store another command may not have finished."""
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="go on (with a warning) with an unfinished run or store instead of refusing it")


def add_model_dtype_argument(parser) -> None:
    """--model-dtype, for every command that runs the language model."""
    parser.add_argument("--trust-pickled-weights", action="store_true",
                        help="also load a model whose weights are only pickles (pytorch_model.bin): a pickle can run "
                             "arbitrary code, so only for models from a source you trust (default: safetensors only)")
    parser.add_argument("--model-dtype", type=_model_dtype, default="auto", metavar="DTYPE",
                        help="dtype the language model is loaded in: auto (default: bfloat16 on CUDA, float32 on "
                             "the CPU), float32, bfloat16 or float16; weights are read straight into it")


SITE_HELP = ("resid_pre, resid_post, attn_out, mlp_out (what attention / the MLP adds to the residual stream), "
             "mlp_in (the MLP's input, after its pre-norm), mlp_hidden, attn_z (per-head attention outputs, "
             "n_heads x d_head: the input of the attention's output projection), or a module path "
             "(e.g. model.layers.6.mlp; '{layer}' is replaced by each layer; ':input' reads the module's input)")


def add_source_arguments(parser, model_default: str | None, model_help: str, layers_required: bool) -> None:
    """Where activations come from, as `sae collect` and live `sae train --model` both take them."""
    parser.add_argument("--model", default=model_default, help=model_help)
    parser.add_argument("--dataset", default="bbc",
                        help="Hugging Face dataset id (owner/name[:config]), local .txt/.jsonl/.parquet file or "
                             "folder, or bbc (embedded default)")
    parser.add_argument("--layers", default=None, required=layers_required,
                        help="layer index or comma-separated indices, e.g. 6 or 3,6,9 (one SAE each when training)")
    parser.add_argument("--site", default="resid_post", help=SITE_HELP + " (default resid_post)")
    parser.add_argument("--text-column", default=None, help="the dataset's text column (default: text)")
    parser.add_argument("--split", default=None, help="dataset split for hub datasets (default: train)")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window, BOS included (default 128)")
    parser.add_argument("--keep-special-tokens", "--keep-special", dest="keep_special_tokens", action="store_true",
                        help="also keep BOS/EOS/padding positions (dropped by default: their norms dwarf the rest)")
    parser.add_argument("--max-norm-ratio", type=float, default=None,
                        help="drop tokens whose norm exceeds R x the layer's median norm")
    add_model_dtype_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    from sae import __version__
    parser = _Parser(prog="sae", description="Sparse autoencoders for language-model activations.")
    parser.add_argument("--version", action="version", version=f"sae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"sae.commands.{name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("SAE_DEBUG") == "1"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "_run", None):
            parser.print_help()
            sys.exit(2)
        if getattr(args, "trust_pickled_weights", False):   # read where the model is loaded (sae.lm.loading)
            os.environ["SAE_TRUST_PICKLED_WEIGHTS"] = "1"
        status = args._run(args)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(int(status or 0))


def entry() -> None:
    """The `sae` command (console script and `python -m sae`): main() in a process whose malloc keeps freed
    memory, so the commands' big per-batch temporaries are reused instead of page-faulting in anew, and
    which ends without the interpreter's teardown (freeing every tensor and module of torch one by one: 0.2 s
    and more a command) once the command has returned and its output is flushed. Every file a command
    writes is closed (and renamed into place) before it returns. Under torchrun (WORLD_SIZE > 1) the same,
    once sae.distributed.teardown() has passed its barrier (every rank is done with its collectives) and
    destroyed the process group: the interpreter's teardown would race gloo's worker threads, which may still
    need the GIL. Otherwise (a group still initialised, or left after an error) the process exits the ordinary
    way: a rank leaving early would reset its peers' connections. Kept out of main() itself, which tests and
    other programs call in their own processes."""
    from sae.devices import keep_freed_memory
    keep_freed_memory()
    try:
        main()
        code = 0
    except SystemExit as done:
        code = done.code
    if code is None:
        code = 0
    elif not isinstance(code, int):       # sys.exit("message") or another object: as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    torch_distributed = sys.modules.get("torch.distributed")
    launched = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")
    grouped = torch_distributed is not None and torch_distributed.is_available() and torch_distributed.is_initialized()
    sae_distributed = sys.modules.get("sae.distributed")
    left_cleanly = sae_distributed is not None and sae_distributed.left_cleanly()
    if grouped or (launched and not left_cleanly):   # torchrun without a clean teardown: the usual way
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
