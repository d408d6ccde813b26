"""`sae eval --run RUN --activations STORE`: score a trained SAE on the store's held-out documents."""
HELP = "score a trained SAE on a store's held-out documents; writes RUN/eval.json and prints it"


def add_arguments(parser):
    from sae.cli import add_common_arguments, add_model_dtype_argument, add_run_store_arguments
    add_run_store_arguments(parser, "the store's layer (default: the run's layer)")
    parser.add_argument("--no-model", action="store_true",
                        help="skip the downstream part (no language model is loaded)")
    parser.add_argument("--windows", type=int, default=64,
                        help="held-out context windows replayed through the model (default 64)")
    parser.add_argument("--lm-batch-size", type=int, default=4, help="windows per model forward (default 4)")
    parser.add_argument("--no-probing", action="store_true", help="skip sparse probing on labelled stores")
    parser.add_argument("--probe-rows", type=int, default=200_000,
                        help="at most this many rows (whole documents) are pooled for sparse probing")
    parser.add_argument("--json", action="store_true", help="print eval.json instead of the table")
    from sae.cli import add_max_tokens_argument
    add_max_tokens_argument(parser, "score at most N held-out tokens: the store's first shards up to its N-th "
                                    "held-out row (probing and the model replay read the same shards)")
    add_model_dtype_argument(parser)
    add_common_arguments(parser, batch="rows")


def run(args):
    import json

    from sae.devices import resolve
    from sae.errors import UserError
    from sae.evaluate.metrics import EVAL_FILE, evaluate, format_table

    if args.windows < 1 or args.lm_batch_size < 1:
        raise UserError("--windows and --lm-batch-size must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.probe_rows < 1:
        raise UserError(f"--probe-rows must be at least 1, got {args.probe_rows}")
    from sae.runs import resolve_run
    args.run = resolve_run(args.run)   # RELEASE:SAE_ID -> a run folder under the cache
    store = args.activations
    if args.max_tokens is not None:
        from sae.store import ActivationStore
        store = ActivationStore(store).head(held_out=args.max_tokens)
    result = evaluate(args.run, store, layer=args.layer, with_model=not args.no_model,
                      device=resolve(args.device), batch_size=args.batch_size or 4096, max_windows=args.windows,
                      lm_batch_size=args.lm_batch_size, probe=not args.no_probing, probe_max_rows=args.probe_rows,
                      seed=args.seed, model_dtype=args.model_dtype, allow_incomplete=args.allow_incomplete)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    if not args.json:
        print(f"(written to {args.run}/{EVAL_FILE})")
    return 0
