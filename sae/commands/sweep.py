"""`sae sweep --activations STORE --out DIR`: train and evaluate a grid of variants in one pass over the data."""
HELP = "train and evaluate a grid of variants in one pass over the data; writes DIR/sweep.{parquet,csv,png}"


def add_arguments(parser):
    from sae.cli import add_common_arguments
    parser.add_argument("--activations", required=True, metavar="STORE", help="the activation store")
    parser.add_argument("--out", required=True, metavar="DIR", help="the sweep folder (one run folder per SAE)")
    parser.add_argument("--layer", default=None, help="the store's layer (required when it holds several)")
    parser.add_argument("--variants", default=None, metavar="SPEC",
                        help="comma-separated variants, each optionally with knob values: "
                             "'topk,l1' (their default points) or 'topk:k=16/32/64,kl:kl_coefficient=0.1/1'. "
                             "Default: the modern family at k in {16,32,64} (or three penalties) and the "
                             "classic family at its defaults")
    parser.add_argument("--grid", default=None, metavar="FILE",
                        help="a YAML/JSON grid file: a list of entries, each with its own variant, knobs, d_sae or "
                             "expansion, lr and name (see sae.evaluate.grid); replaces --variants")
    from sae.evaluate import DEFAULT_TOKENS
    parser.add_argument("--tokens", type=int, default=None,
                        help=f"training tokens, shared by every SAE (default {DEFAULT_TOKENS:,})")
    parser.add_argument("--expansion", type=float, default=8.0, help="d_sae = expansion × d_in (default 8)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: each variant's own)")
    parser.add_argument("--no-model", action="store_true", help="skip the downstream (CE loss) evaluation")
    parser.add_argument("--windows", type=int, default=8,
                        help="held-out windows replayed through the model for every SAE (default 8)")
    parser.add_argument("--probe-rows", type=int, default=50_000,
                        help="rows (whole documents) pooled for sparse probing on labelled stores")
    parser.add_argument("--resume", action="store_true", help="keep the SAEs already finished in DIR, train the rest")
    parser.add_argument("--force", action="store_true", help="replace an existing sweep in DIR")
    from sae.cli import add_log_arguments, add_model_dtype_argument
    add_log_arguments(parser)
    add_model_dtype_argument(parser)
    add_common_arguments(parser)


def run(args):
    from sae.errors import UserError
    from sae.evaluate import DEFAULT_TOKENS

    if args.tokens is None:
        args.tokens = DEFAULT_TOKENS

    if args.tokens < 1 or args.expansion <= 0 or args.windows < 1:
        raise UserError("--tokens, --expansion and --windows must be positive")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be positive, got {args.batch_size}")
    if args.probe_rows < 1:
        raise UserError(f"--probe-rows must be positive, got {args.probe_rows}")
    if args.variants is not None and not args.variants.strip(" ,"):
        raise UserError("--variants is empty: name at least one variant (e.g. topk,l1)")
    if args.force and args.resume:
        raise UserError("--force and --resume contradict each other: pick one")
    grid = None
    if args.grid is not None:
        if args.variants is not None:
            raise UserError("give --variants or --grid, not both")
        from sae.evaluate.grid import read_grid
        grid = read_grid(args.grid)
    from sae.train import loggers
    with loggers.from_args(args):       # --log: each SAE of the grid its own logged run, grouped under --out
        table = _sweep(args, grid)
    if table is not None:
        _report(args, table)
    return 0


def _sweep(args, grid):
    from sae.evaluate.sweep import run_sweep
    return run_sweep(args.activations, args.out, variants_spec=args.variants, layer=args.layer, tokens=args.tokens,
                     batch_size=args.batch_size or 1024, expansion=args.expansion, lr=args.lr, seed=args.seed,
                     device=args.device, with_model=not args.no_model, windows=args.windows,
                     probe_rows=args.probe_rows, force=args.force, resume=args.resume,
                     model_dtype=args.model_dtype, grid=grid)


def _report(args, table) -> None:
    from pathlib import Path

    from sae.evaluate.sweep import format_table
    from sae.files import read_json
    record = read_json(Path(args.out) / "sweep.json")
    print(format_table(table))
    print(f"wall time {record['wall_seconds']:.1f} s (training {record['train_wall_seconds']:.1f} s); "
          f"written to {args.out}/sweep.parquet, sweep.csv, sweep.png")
