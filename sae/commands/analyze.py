"""`sae analyze --run RUN --activations STORE`: per-feature data for the dashboard (RUN/analysis/)."""
HELP = "builds the per-feature data that the dashboard shows (RUN/analysis/)"


def add_arguments(parser):
    from sae.cli import add_common_arguments, add_model_dtype_argument, add_run_store_arguments
    add_run_store_arguments(parser, "the store's layer (required when it holds several)")
    from sae.cli import add_max_tokens_argument
    add_max_tokens_argument(parser, "analyse the store's first N rows only")
    parser.add_argument("--out", default=None, help="output folder (default RUN/analysis)")
    parser.add_argument("--top-k", type=int, default=20, help="top-activating examples kept per feature (default 20)")
    parser.add_argument("--context", type=int, default=10, help="context tokens either side of an example (default 10)")
    parser.add_argument("--bands", type=int, default=5, help="activation bands for interval examples (default 5)")
    parser.add_argument("--per-band", type=int, default=5, help="interval examples per band (default 5)")
    parser.add_argument("--reservoir", type=int, default=64,
                        help="per-feature reservoir sample that interval examples are drawn from (default 64)")
    parser.add_argument("--nearest", type=int, default=10, help="nearest features by decoder cosine (default 10)")
    parser.add_argument("--logits", type=int, default=10, help="promoted/suppressed tokens per feature (default 10)")
    parser.add_argument("--no-model", action="store_true", help="do not load the model (skips logit effects)")
    parser.add_argument("--force", action="store_true", help="replace an existing analysis")
    add_model_dtype_argument(parser)
    add_common_arguments(parser, batch="rows")


def run(args):
    from sae.analyze.pipeline import AnalyzeOptions, analyze
    from sae.runs import resolve_run

    args.run = resolve_run(args.run)   # RELEASE:SAE_ID -> a run folder under the cache

    options = AnalyzeOptions(n_top=args.top_k, context_radius=args.context, n_bands=args.bands,
                             per_band=args.per_band, reservoir=max(args.reservoir, args.per_band) if args.reservoir > 0 else args.reservoir,
                             n_nearest=args.nearest, n_logits=args.logits, batch_size=4096 if args.batch_size is None else args.batch_size,
                             device=args.device, with_model=not args.no_model, seed=args.seed,
                             model_dtype=args.model_dtype, allow_incomplete=args.allow_incomplete)
    store = args.activations
    if args.max_tokens is not None:
        from sae.store import ActivationStore
        store = ActivationStore(store).head(rows=args.max_tokens)
    meta = analyze(args.run, store, layer=args.layer, options=options, out_dir=args.out,
                   force=args.force)
    dead = meta.get("n_dead")
    print(f"analysed {meta['n_features']} features over {meta['n_tokens']} tokens in {meta['pass_seconds']:.1f} s"
          + ("" if dead is None or meta["signed_codes"] else f"; {dead} never fired")
          + f"; logit effects: {'yes' if meta['logit_effects'] else 'no'}"
          + f"; contexts: {'yes' if meta['has_contexts'] else 'no'}")
    print(f"wrote {args.out or (args.run.rstrip('/') + '/analysis')}")
