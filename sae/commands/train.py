"""`sae train`: train one SAE of a variant on an activation store (or, with --model, straight from a model).

Every knob of every registered variant becomes an option (--k, --l1-coefficient, ...); a knob given to a
variant that does not take it is refused, naming the variants that do.
"""
from __future__ import annotations

import argparse
import sys

from sae.errors import UserError

HELP = "train a sparse autoencoder on an activation store (or live from a model)"

# TrainOptions fields set from the command line: option name -> field
_OPTION_FIELDS = {"tokens": "tokens", "lr": "lr", "noise_std": "noise_std", "mask_prob": "mask_prob",
                  "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints",
                  "log_every": "log_every", "dead_after_tokens": "dead_after_tokens", "lr_warmup": "lr_warmup",
                  "lr_decay": "lr_decay", "sparsity_warmup": "sparsity_warmup", "grad_clip": "grad_clip",
                  "eval_rows": "eval_rows", "bf16": "cpu_bf16"}


def _bool(text: str) -> bool:
    if str(text).lower() in ("1", "true", "yes", "on"):
        return True
    if str(text).lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _knob_table() -> dict[str, tuple[object, list[str]]]:
    """knob name -> (first Knob seen, variants that take it), over every registered variant."""
    from sae import variants
    table: dict[str, tuple[object, list[str]]] = {}
    for name in variants.names():
        for knob_name, knob in variants.get(name).KNOBS.items():
            table.setdefault(knob_name, (knob, []))[1].append(name)
    return table


def add_arguments(parser) -> None:
    """The fixed options now; the variants' knobs (which need torch) when `train` is actually parsed,
    so that `sae --help` stays fast."""
    from sae.cli import add_common_arguments
    add_common_arguments(parser)
    parser.add_argument("--activations", metavar="STORE", help="activation store to train on")
    parser.add_argument("--variant", required=True, metavar="V", help="the variant to train")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to write")
    parser.add_argument("--layer", default=None, help="layer to train on (required when the store holds several)")
    width = parser.add_mutually_exclusive_group()
    width.add_argument("--expansion", type=float, default=None, help="d_sae = expansion × d_in (default 8)")
    width.add_argument("--d-sae", type=int, default=None, help="number of latents (codebook size for vq)")
    width.add_argument("--codebook-size", type=int, default=None, help="vq only: the codebook size (= --d-sae)")
    parser.add_argument("--tokens", type=int, default=None, help="training budget in tokens (default 524,288)")
    parser.add_argument("--lr", type=float, default=None, help="peak Adam learning rate (default: scaled with d_sae)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--init-from", metavar="RUN", default=None, help="fine-tune this SAE (a run, a SAELens or "
                        "sparsify folder, a release) on the store instead of starting from scratch")
    from sae.cli import add_allow_incomplete_argument
    add_allow_incomplete_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace the run already in --out")
    parser.add_argument("--transcoder", action="store_true",
                        help="train a transcoder: read the store's site (mlp_in), predict its target site (mlp_out); "
                             "live: --site mlp_in --target-site mlp_out")
    parser.add_argument("--skip", action="store_true",
                        help="with --transcoder: add a learned linear skip connection (skip transcoder)")
    parser.add_argument("--noise-std", type=float, default=None,
                        help="Gaussian input corruption (std per dimension of the scaled input); any variant")
    parser.add_argument("--mask-prob", type=float, default=None, help="mask input dimensions with this probability")
    parser.add_argument("--checkpoint-every", default=None, metavar="N|TIME",
                        help="steps (500) or wall time (10m, 90s, 1h) between checkpoints (default 10m)")
    parser.add_argument("--keep-checkpoints", type=int, default=None, help="checkpoints kept (default 3; 0 = all)")
    parser.add_argument("--log-every", type=int, default=None, help="steps between metrics.jsonl lines (default 10)")
    parser.add_argument("--dead-after-tokens", type=int, default=None,
                        help="tokens without firing after which a latent counts as dead")
    parser.add_argument("--lr-warmup", type=float, default=None, help="fraction of steps of LR warm-up (0.02)")
    parser.add_argument("--lr-decay", type=float, default=None, help="final fraction of steps of LR decay (0.2)")
    parser.add_argument("--sparsity-warmup", type=float, default=None, help="fraction of steps of penalty warm-up")
    parser.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm (off by default)")
    parser.add_argument("--bf16", action="store_const", const=True, default=None,
                        help="CPU: matrix products with bf16 inputs and fp32 results in training, 2-4x faster on "
                             "CPUs with bf16 units (AVX512-BF16, AMX), slower on CPUs without them; CUDA always "
                             "trains under bf16 autocast")
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out tokens scored at the end (16,384)")
    from sae.cli import add_log_arguments
    add_log_arguments(parser)
    parser.add_argument("--shard-latents", action="store_true",
                        help="under torchrun: split the latents across ranks (very wide topk SAEs; sae.sharded)")
    parser.add_argument("--dist-backend", default="auto", choices=["auto", "nccl", "gloo"],
                        help="torch.distributed backend under torchrun")
    from sae.cli import add_source_arguments
    live = parser.add_argument_group("live training (no store): one SAE per layer from one forward pass")
    add_source_arguments(live, None, "train live from this model (HF id, folder, or smollm2) instead of a store",
                         layers_required=False)
    live.add_argument("--model-batch", type=int, default=8, help="context windows per model forward pass (default 8)")
    live.add_argument("--buffer-size", default="256MB", help="memory for shuffled activations (default 256MB)")
    live.add_argument("--save-activations", default=None, metavar="STORE",
                      help="also write the activations seen to a store")
    parse = parser.parse_known_args

    def parse_with_knobs(args=None, namespace=None):
        _add_knob_arguments(parser)
        return parse(args, namespace)
    parser.parse_known_args = parse_with_knobs
    parser._sae_add_lazy_arguments = lambda: _add_knob_arguments(parser)   # for sae.config's key table


def _add_knob_arguments(parser) -> None:
    if getattr(parser, "_sae_knobs_added", False):
        return
    parser._sae_knobs_added = True
    from sae import variants
    for action in parser._actions:
        if action.dest == "variant":
            action.help = f"one of: {', '.join(variants.names())}"
    knobs = parser.add_argument_group("variant knobs (each applies only to the variants listed)")
    for knob_name, (knob, takers) in sorted(_knob_table().items()):
        kind = _bool if knob.type is bool else knob.type
        knobs.add_argument(f"--{knob_name.replace('_', '-')}", dest=f"knob_{knob_name}", type=kind, default=None,
                           metavar=knob.type.__name__.upper(),
                           help=f"{knob.help} (default {knob.default}; variants: {', '.join(takers)})")


def given_knobs(args, variant: str) -> dict:
    """The knobs set on the command line, refused when the variant does not take them."""
    from sae import variants
    cls = variants.get(variant)
    table = _knob_table()
    given = {name: getattr(args, f"knob_{name}") for name in table if getattr(args, f"knob_{name}", None) is not None}
    for name in given:
        if name not in cls.KNOBS:
            raise UserError(f"--{name.replace('_', '-')} does not apply to variant {variant}; "
                            f"it is taken by: {', '.join(table[name][1])}")
    return given


def options_from_args(args):
    """TrainOptions from the parsed command line (unset options keep the defaults)."""
    from sae.train.options import TrainOptions
    values = {"seed": args.seed, "device": args.device}
    if args.batch_size is not None:
        values["batch_size"] = args.batch_size
    for option, field in _OPTION_FIELDS.items():
        if getattr(args, option, None) is not None:
            values[field] = getattr(args, option)
    if args.checkpoint_every is not None:      # 500 (steps) or 10m; 0 refused on the command line
        from sae.train.schedule import parse
        every = parse(args.checkpoint_every)
        values["checkpoint_every"] = every if isinstance(every, int) else str(args.checkpoint_every).strip()
    return TrainOptions(**values)     # refuses bad values itself


def run(args) -> int:
    from sae import distributed, variants
    from sae.devices import resolve
    variants.get(args.variant)  # unknown variant: list the valid ones
    knobs = given_knobs(args, args.variant)
    if args.codebook_size is not None:
        if args.variant != "vq":
            raise UserError(f"--codebook-size applies only to the variant vq, not {args.variant} (use --d-sae)")
        if args.codebook_size <= 0:
            raise UserError(f"--codebook-size must be positive, got {args.codebook_size}")
        args.d_sae = args.codebook_size
    if args.d_sae is not None and args.d_sae <= 0:
        raise UserError(f"--d-sae must be positive, got {args.d_sae}")
    if args.expansion is not None and not args.expansion > 0:
        raise UserError(f"--expansion must be positive, got {args.expansion}")
    options = options_from_args(args)
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: pick one")
    from sae.train.transcoding import check_options
    check_options(args.transcoder, args.skip)
    if args.model is None and args.target_site is not None:
        raise UserError("--target-site is for `sae collect` and live training (--model): a store records its own")
    if args.init_from is not None and (args.model is not None or args.shard_latents):
        raise UserError("--init-from fine-tunes on a store (--activations), without --shard-latents")
    if args.model is not None:
        if args.activations is not None:
            raise UserError("give either --activations (train on a store) or --model (train live), not both")
        from sae.train import loggers
        with loggers.from_args(args) as log:       # --log: one logged run per layer, grouped under --out
            status = _run_live(args, options, knobs)
            if log is not None:
                log.exit_code = status
        return status
    if args.activations is None:
        raise UserError("--activations STORE (or --model for live training) is required")
    device = resolve(args.device)
    dist = distributed.setup(device.type, args.dist_backend)
    try:
        from sae.train import loggers
        with loggers.from_args(args, enabled=dist.is_main) as log:   # --log: closed on success, error and Ctrl-C
            status = _run_store(args, options, knobs)
            if log is not None:
                log.exit_code = status
        return status
    finally:
        distributed.teardown(clean=sys.exc_info()[0] is None)


def _run_store(args, options, knobs) -> int:
    """`sae train --activations STORE`: one SAE (its latents split across ranks with --shard-latents)."""
    from sae.train.trainer import train_on_store
    from sae.interop import open_store
    store = open_store(args.activations)  # this project's store or a SAELens activation cache
    if args.shard_latents:
        if args.transcoder:
            raise UserError("--shard-latents trains plain topk SAEs only, not --transcoder")
        if options.cpu_bf16:
            raise UserError("--bf16 does not apply to --shard-latents (sharded training runs on GPUs, "
                            "under bf16 autocast)")
        from sae.train.sharded import train_sharded_on_store
        train_sharded_on_store(store, args.variant, args.out, options, knobs=knobs, layer=args.layer,
                               d_sae=args.d_sae, expansion=args.expansion, force=args.force, resume=args.resume)
        return 0
    if args.resume:
        from sae.train import sharded_checkpoint
        if sharded_checkpoint.latest(args.out) is not None:
            raise UserError(f"cannot resume {args.out} without --shard-latents: it is a --shard-latents run "
                            f"(resume it under torchrun with --shard-latents)")
    summary = train_on_store(store, args.variant, args.out, options, knobs=knobs, layer=args.layer,
                             allow_incomplete=args.allow_incomplete,
                             d_sae=args.d_sae, expansion=args.expansion, resume=args.resume, force=args.force,
                             progress=True, transcoder=args.transcoder, skip=args.skip, init_from=args.init_from)
    return 130 if summary.get("interrupted") else 0


def _run_live(args, options, knobs) -> int:
    """`sae train --model M --dataset D --layers L[,L2] --site S`: one SAE per layer from one forward pass."""
    from pathlib import Path

    from sae.data import load_documents
    from sae.devices import resolve
    from sae.lm import load_model
    from sae.train.live import LiveOptions, train_live
    if args.layers is None:
        raise UserError("live training (--model) needs --layers (e.g. --layers 6 or --layers 3,6,9)")
    if args.layer is not None:
        raise UserError("live training takes --layers, not --layer")
    source = LiveOptions(model=args.model, layers=args.layers, site=args.site, target_site=args.target_site,
                         dataset=args.dataset,
                         text_column=args.text_column, split=args.split, context_size=args.context_size,
                         model_batch=args.model_batch, buffer_size=args.buffer_size,
                         max_norm_ratio=args.max_norm_ratio, keep_special_tokens=args.keep_special_tokens,
                         save_activations=args.save_activations, model_dtype=args.model_dtype)
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: pick one")
    documents = lambda: load_documents(source.dataset, source.text_column, source.split)  # noqa: E731
    _, label_names = documents()          # a bad dataset is refused before the model loads
    loaded = load_model(source.model, device=resolve(options.device), dtype=source.model_dtype)
    metrics = train_live(loaded, lambda: documents()[0], source, variant=args.variant, out=args.out, options=options,
                         knobs=knobs, d_sae=args.d_sae, expansion=args.expansion, label_names=label_names,
                         resume=args.resume, force=args.force, transcoder=args.transcoder, skip=args.skip)
    for layer, last in metrics.items():
        held = last.get("held_out") or {}
        figures = ", ".join(f"{name} {value:.4g}" for name, value in
                            (("train FVU", last.get("fvu")), ("held-out FVU", held.get("fvu")),
                             ("L0", held.get("l0", last.get("l0")))) if value is not None)
        print(f"{Path(args.out) / f'layer_{layer}'}: step {last.get('step')}" + (f", {figures}" if figures else ""))
    return 130 if any(last.get("interrupted") for last in metrics.values()) else 0

