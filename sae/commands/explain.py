"""`sae explain --run RUN --activations STORE`: explanations of features, with scores and their controls."""
HELP = "writes an explanation of each chosen feature, with scores, to RUN/analysis/explanations.parquet"


def add_arguments(parser):
    from sae.cli import add_common_arguments, add_model_dtype_argument, add_run_store_arguments
    add_run_store_arguments(parser, "the store's layer (default: the run's layer)")
    parser.add_argument("--features", default="64",
                        help="N (the N densest features, default 64), all, or a comma-separated list of ids")
    parser.add_argument("--explainer", default="smollm2",
                        help="in-process explainer: smollm2 (embedded default), a Hugging Face causal LM id or folder")
    parser.add_argument("--explainer-url", default=None, metavar="URL",
                        help="an OpenAI-compatible chat endpoint instead (e.g. http://localhost:8000/v1 for vLLM "
                             "or llama.cpp's server)")
    parser.add_argument("--explainer-model", default=None, metavar="NAME", help="the model name the endpoint serves")
    parser.add_argument("--explainer-key-env", default="OPENAI_API_KEY", metavar="VAR",
                        help="environment variable holding the endpoint's API key (default OPENAI_API_KEY)")
    parser.add_argument("--scorers", default=None,
                        help="some of detection,fuzzing,embedding (default: all three; embedding only with the "
                             "embedded smollm2 judge, whose yes/no answers score at chance)")
    parser.add_argument("--examples", type=int, default=6, help="top examples shown to the explainer (default 6)")
    parser.add_argument("--score-examples", type=int, default=8,
                        help="held-out activating contexts per feature for scoring, and as many non-activating (default 8)")
    parser.add_argument("--context", type=int, default=8, help="tokens either side of an example shown (default 8)")
    parser.add_argument("--lm-batch-size", type=int, default=16, help="prompts per forward of a local explainer")
    parser.add_argument("--force", action="store_true", help="replace explanations written before")
    add_model_dtype_argument(parser)
    add_common_arguments(parser)


def run(args):
    from sae.errors import UserError
    from sae.explain.contexts import ContextOptions
    from sae.explain.pipeline import ExplainOptions, explain
    from sae.runs import resolve_run

    for name in ("examples", "score_examples", "lm_batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.context < 0:
        raise UserError(f"--context must be >= 0, got {args.context}")
    options = ExplainOptions(
        features=args.features, explainer=args.explainer, explainer_url=args.explainer_url,
        explainer_model=args.explainer_model, key_env=args.explainer_key_env,
        scorers=None if args.scorers is None else tuple(s.strip() for s in args.scorers.split(",") if s.strip()),
        batch_features=args.batch_size or ExplainOptions.batch_features, lm_batch_size=args.lm_batch_size, device=args.device,
        model_dtype=args.model_dtype, seed=args.seed, force=args.force, allow_incomplete=args.allow_incomplete,
        contexts=ContextOptions(radius=args.context, n_explain_top=args.examples, n_score=args.score_examples,
                                seed=args.seed))
    summary = explain(resolve_run(args.run), args.activations, options, layer=args.layer)
    print(f"explained {summary['n_explained']} features ({summary['n_new']} new) with {summary['explainer']} "
          f"in {summary['seconds']:.1f} s")
    for name in ("detection", "fuzzing", "embedding"):
        own, control = summary.get(f"mean_{name}"), summary.get(f"mean_{name}_control")
        if own is not None:
            print(f"  {name:<10} mean {own:.3f}   random-pairing control {control if control is None else f'{control:.3f}'}")
    print(f"wrote {summary['path']}" if summary["n_new"] else f"nothing new to explain: {summary['path']} is unchanged")
