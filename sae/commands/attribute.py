"""`sae attribute --run RUN… --prompt TEXT [--target TOKEN] --out GRAPH.json`: the attribution graph of a prompt
over transcoders for every layer (or SAEs at mlp_out, with error nodes)."""
HELP = "build the attribution graph of a prompt over transcoders (GRAPH.json, drawn by `sae dashboard`)"


def add_arguments(parser):
    from sae.cli import add_common_arguments, add_model_dtype_argument
    parser.add_argument("--run", nargs="+", required=True, metavar="RUN",
                        help="transcoder runs, one per layer (or a live-training RUN holding layer_L/ runs); SAE runs "
                             "at mlp_out also work (their features have outgoing edges only)")
    parser.add_argument("--prompt", required=True, help="the text whose next token is attributed")
    parser.add_argument("--target", default=None, metavar="TOKEN",
                        help="the token whose logit at the last position is explained (one token, e.g. ' Paris'; "
                             "default: the model's top prediction)")
    parser.add_argument("--out", required=True, metavar="GRAPH.json",
                        help="where the graph is written (put it in RUN/graphs/ to see it in `sae dashboard RUN`)")
    parser.add_argument("--model", default=None,
                        help="the language model (default: the one the runs were trained on)")
    parser.add_argument("--node-threshold", type=float, default=0.8,
                        help="keep the nodes holding this share of the influence on the target (default 0.8)")
    parser.add_argument("--edge-threshold", type=float, default=0.98,
                        help="keep the edges holding this share of the remaining influence (default 0.98)")
    parser.add_argument("--max-feature-nodes", type=int, default=256,
                        help="features whose inputs are computed, most influential first (default 256; 0: none)")
    parser.add_argument("--allow-missing", action="store_true",
                        help="allow layers without a transcoder: their MLPs are kept whole, as error nodes")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    add_model_dtype_argument(parser)
    add_common_arguments(parser)


def run(args):
    from pathlib import Path

    from sae.attribute.pipeline import AttributeOptions, attribute
    from sae.devices import resolve
    from sae.errors import UserError
    if Path(args.out).is_file() and not args.force:
        raise UserError(f"{args.out} exists: pass --force to replace it")
    opts = AttributeOptions(runs=args.run, prompt=args.prompt, target=args.target, out=args.out, model=args.model,
                            node_threshold=args.node_threshold, edge_threshold=args.edge_threshold,
                            max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size or 64,
                            allow_missing=args.allow_missing, device=resolve(args.device),
                            model_dtype=args.model_dtype)
    graph = attribute(opts)
    done = graph["completeness"]
    counts = graph["counts"]
    print(f"target {graph['target']['token']!r} (logit {graph['target']['logit']:.4g}, "
          f"p {graph['target']['probability']:.3g}); {counts['features_active']} active features, "
          f"{counts['features_visited']} with inputs; kept {counts['nodes']} nodes and {counts['edges']} edges; "
          f"completeness: direct effects + bias = {done['direct_sum'] + done['bias']:.6g} "
          f"(relative error {done['relative_error']:.1e})")
    print(f"(written to {args.out})")
    return 0
