"""`sae collect`: run a language model over a dataset and write a site's activations to a store."""
HELP = "run a language model over a dataset and write a site's activations to an activation store"


def add_arguments(parser):
    from sae.cli import add_common_arguments, add_source_arguments
    add_source_arguments(parser, "smollm2", "Hugging Face model id, local model folder, or smollm2 (embedded default)",
                         layers_required=True)
    parser.add_argument("--tokens", type=int, default=None,
                        help="rows (tokens) to write, all ranks together (default: the whole dataset)")
    parser.add_argument("--out", required=True, help="the store folder to write")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="stored dtype (default: the model's dtype, see --model-dtype)")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="rows per shard (default: about 256 MB of activations)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    parser.add_argument("--force", action="store_true", help="replace the store in a non-empty --out")
    add_common_arguments(parser, batch="windows")
    parser.add_argument("--batch-tokens", type=int, default=None, metavar="N",
                        help="size a forward pass in tokens instead of --batch-windows: "
                             "max(1, N // --context-size) windows per forward pass")


def run(args):
    import sys

    import torch

    from sae import distributed
    from sae.collect import CollectOptions, collect
    from sae.files import human_bytes
    options = CollectOptions(
        model=args.model, layers=args.layers, site=args.site, target_site=args.target_site, dataset=args.dataset,
        out=args.out, tokens=args.tokens, context_size=args.context_size, batch_size=args.batch_size,
        batch_tokens=args.batch_tokens, dtype=args.dtype, device=args.device, text_column=args.text_column,
        split=args.split, keep_special_tokens=args.keep_special_tokens, max_norm_ratio=args.max_norm_ratio,
        shard_tokens=args.shard_tokens, resume=args.resume, force=args.force, model_dtype=args.model_dtype)
    torch.manual_seed(args.seed)
    try:
        result = collect(options)
    finally:
        distributed.teardown(clean=sys.exc_info()[0] is None)
    if not distributed.is_main_process():
        return 0
    if result.already_complete:
        print(f"{result.path} is already complete: {result.n_tokens:,} rows in {result.n_shards} "
              f"shard{'s' if result.n_shards != 1 else ''} ({human_bytes(result.size_bytes)}); nothing to collect")
        return 0
    if result.exhausted and args.tokens is not None:
        print(f"warning: the dataset ran out after {result.n_tokens:,} rows (asked for {args.tokens:,}); "
              f"the store holds what there is", file=sys.stderr)
    layers = result.manifest.get("layers")
    target = result.manifest.get("target_site")
    print(f"wrote {result.n_tokens:,} rows x {len(layers)} layer{'s' if len(layers) != 1 else ''} {layers} "
          f"of {result.manifest.get('site')}{f' and {target}' if target else ''} to {result.path} "
          f"({human_bytes(result.size_bytes)}, "
          f"{result.n_shards} shard{'s' if result.n_shards != 1 else ''})")
    return 0
