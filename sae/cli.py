"""The `sae` console script: a thin dispatcher over sae/commands/<name>.py.

Each command module defines HELP (one line), add_arguments(parser) and run(args) -> int | None.
Bad input raises sae.errors.UserError: printed as one line on stderr, exit status 2.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from sae.config import add_config_arguments
from sae.errors import UserError

COMMANDS = ["collect", "train", "eval", "analyze", "sweep", "export", "dashboard", "push", "explain", "attribute"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad usage as one line (no usage dump), like every other error."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


# what a batch counts in each kind of command: its own option name (the old --batch-size still works, with a notice)
BATCH_OPTIONS = {
    "size": ("--batch-size", "tokens per training step (each command's default suits a CPU)"),
    "windows": ("--batch-windows", "context windows per model forward pass (default 8)"),
    "rows": ("--batch-rows", "activation rows (tokens) per SAE batch (default 4096)"),
}


class _OldBatchSize(argparse.Action):
    """--batch-size where a command now names its batch for what it counts: stored, with a one-line notice."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"notice: {option_string} is spelt {self.new_flag} in `{parser.prog}` (it counts {self.counts})",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def _device(text: str) -> str:
    """auto, or anything torch.device accepts (cpu, cuda, cuda:1, mps, xpu:0, ...); checked without importing
    torch for the plain names (sae.devices.resolve checks that the device exists when it is used)."""
    text = str(text).strip()
    if text in ("auto", "cpu", "cuda"):
        return text
    import torch
    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (e.g. auto, cpu, cuda, cuda:1, mps)") \
            from None
    return text


def add_common_arguments(parser: argparse.ArgumentParser, batch: str = "size") -> None:
    """--device, --seed and the batch option, named for what a batch counts (BATCH_OPTIONS[batch])."""
    parser.add_argument("--device", default="auto", metavar="DEVICE", type=_device,
                        help="auto (default: CUDA when present), cpu, cuda, or any torch device such as cuda:1 or mps")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed: initialisation, batch order and sampling follow from it (default 0)")
    flag, meaning = BATCH_OPTIONS[batch]
    parser.add_argument(flag, dest="batch_size", type=int, default=None, metavar="N", help=meaning)
    if flag != "--batch-size":
        old = parser.add_argument("--batch-size", dest="batch_size", type=int, action=_OldBatchSize, metavar="N",
                                  help=f"the old spelling of {flag}")
        old.new_flag, old.counts = flag, meaning.split(" (")[0].split(" per ")[0]


LOG_BACKENDS = ("none", "wandb", "tensorboard")   # sae.train.loggers.BACKENDS (repeated: `sae --help` needs no torch)


def add_log_arguments(parser) -> None:
    """--log and --log-project, for every command that trains (sae.train.loggers); --wandb, the old spelling."""
    parser.add_argument("--log", default="none", metavar="BACKEND",
                        help=f"also log metrics and the final eval to: {', '.join(LOG_BACKENDS)} (default none); "
                             "each SAE is its own logged run, grouped under --out")
    parser.add_argument("--log-project", default=None, metavar="NAME", help="the wandb project (default sae)")
    parser.add_argument("--wandb", default=None, metavar="PROJECT", help=argparse.SUPPRESS)  # = --log wandb


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


def add_max_tokens_argument(parser, what: str) -> None:
    """--max-tokens N (eval, analyze): bound the pass over a big store."""
    parser.add_argument("--max-tokens", type=_positive_tokens, default=None, metavar="N",
                        help=f"{what} (default: the whole store); only the first shards are opened")


def _positive_tokens(text: str) -> int:
    try:
        value = int(str(text).replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of tokens") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
    parser.add_argument("--target-site", default=None,
                        help="a second site stored beside --site in the same forward pass: a transcoder's target "
                             "(e.g. --site mlp_in --target-site mlp_out)")
    parser.add_argument("--text-column", default=None, help="the dataset's text column (default: text)")
    parser.add_argument("--split", default=None, help="dataset split for hub datasets (default: train)")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window, BOS included (default 128)")
    parser.add_argument("--keep-special-tokens", "--keep-special", dest="keep_special_tokens", action="store_true",
                        help="also keep BOS/EOS/padding positions (dropped by default: their norms dwarf the rest)")
    parser.add_argument("--max-norm-ratio", type=float, default=None,
                        help="drop tokens whose norm exceeds R x the layer's median norm")
    add_model_dtype_argument(parser)


def _autocomplete(parser) -> None:
    """Tab completion (argcomplete): answers the shell and exits when the shell asks, else does nothing."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def build_parser() -> argparse.ArgumentParser:
    from sae import __version__
    parser = _Parser(prog="sae", description="Sparse autoencoders for language-model activations.")
    parser.add_argument("--version", action="version", version=f"sae {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        module = importlib.import_module(f"sae.commands.{name}")
        command_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command_parser)
        add_config_arguments(command_parser)          # --config FILE and --print-config, for every command
        command_parser.set_defaults(_run=module.run)
    parser.add_argument("--completion", choices=["bash", "zsh", "fish"], default=None,
                        help="print the shell code that enables tab completion (e.g. eval \"$(sae --completion bash)\")")
    return parser


def _subparsers(parser) -> dict:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _with_config(parser, argv: list[str]) -> tuple[list[str], str | None]:
    """argv with the command's --config file folded in (sae.config); also the command's name."""
    from sae import config
    commands = _subparsers(parser)
    at = next((i for i, token in enumerate(argv) if token in commands), None)
    if at is None:
        return argv, None
    command, rest = argv[at], argv[at + 1:]
    if config.config_path(rest) is None:
        return argv, command
    others = {name: config.key_table(p) for name, p in commands.items() if name != command}
    return argv[:at + 1] + config.prepare(commands[command], command, rest, others), command


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = os.environ.get("SAE_DEBUG") == "1"
    try:
        parser = build_parser()
        _autocomplete(parser)
        argv, command = _with_config(parser, list(argv))
        args = parser.parse_args(argv)
        if getattr(args, "config", None) is not None and command is not None:
            from sae import config
            if config.config_path(argv[argv.index(command) + 1:]) is None:     # e.g. --conf, abbreviated
                raise UserError("write --config FILE in full (an abbreviated --config is not read)")
        if args.completion:
            import argcomplete
            print(argcomplete.shellcode(["sae"], shell=args.completion))
            sys.exit(0)
        if not getattr(args, "_run", None):
            parser.print_help()
            sys.exit(2)
        if getattr(args, "print_config", False):
            from sae import config
            from_json = str(getattr(args, "config", None) or "").endswith(".json")
            print(config.dump(config.effective(_subparsers(parser)[command], command, args), as_json=from_json),
                  end="" if not from_json else "\n")
            sys.exit(0)
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
    from sae.threads import apply as apply_thread_policy
    apply_thread_policy(sys.argv[1:])     # OpenMP's waiting policy, before torch loads (sae.devices imports it)
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
    loggers = sys.modules.get("sae.train.loggers")
    if loggers is not None:          # a logged run still open (it is normally closed by its command): close it
        loggers.close_all(code)
    if grouped or (launched and not left_cleanly):   # torchrun without a clean teardown: the usual way
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
