"""`sae export RUN --format saelens|sparsify|html|neuronpedia OUT`."""
HELP = ("write a trained SAE in SAELens's (or sparsify's) layout, or its analysed features as static HTML or "
        "Neuronpedia's upload batches")


def add_arguments(parser):
    parser.add_argument("run", metavar="RUN", help="a run folder (RUN/config.json + RUN/sae.safetensors)")
    parser.add_argument("--format", required=True, choices=["saelens", "sparsify", "html", "neuronpedia"],
                        help="saelens: cfg.json + sae_weights.safetensors (+ sparsity.safetensors); "
                             "sparsify: cfg.json + sae.safetensors (topk only); "
                             "html: index + one page per feature from RUN/analysis; "
                             "neuronpedia: batch-<n>.json (features, examples, logit tables) + explanations.json, "
                             "what Neuronpedia's uploader takes (docs/files.md)")
    parser.add_argument("out", metavar="OUT", help="output folder (must be empty unless --force)")
    from sae.cli import add_allow_incomplete_argument
    add_allow_incomplete_argument(parser)
    parser.add_argument("--force", action="store_true", help="replace a non-empty OUT")


def run(args):
    from sae.export import export
    out = export(args.run, args.out, args.format, force=args.force, allow_incomplete=args.allow_incomplete)
    print(f"wrote {args.format} export of {args.run} to {out}")
