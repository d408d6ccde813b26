"""`sae collect`: run a language model over a dataset and write a site's activations to a store."""
HELP = "run a language model over a dataset and write a site's activations to an activation store"

SITE_HELP = ("resid_pre, resid_post, attn_out, mlp_out, mlp_hidden, or a module path "
             "(e.g. model.layers.6.mlp; '{layer}' is replaced by each layer; ':input' reads the module's input)")


def add_arguments(parser):
    from sae.cli import add_common_arguments
    parser.add_argument("--model", default="smollm2",
                        help="Hugging Face model id, local model folder, or smollm2 (embedded default)")
    parser.add_argument("--layers", required=True, help="layer index or comma-separated indices, e.g. 6 or 3,6,9")
    parser.add_argument("--site", default="resid_post", help=SITE_HELP + " (default resid_post)")
    parser.add_argument("--dataset", default="bbc",
                        help="Hugging Face dataset id (owner/name[:config]), local .txt/.jsonl/.parquet file or "
                             "folder, or bbc (embedded default)")
    parser.add_argument("--text-column", default=None, help="the dataset's text column (default: text)")
    parser.add_argument("--split", default=None, help="dataset split for hub datasets (default: train)")
    parser.add_argument("--tokens", type=int, default=None,
                        help="rows (tokens) to write, all ranks together (default: the whole dataset)")
    parser.add_argument("--out", required=True, help="the store folder to write")
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window, BOS included (default 128)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="stored dtype (default float32)")
    parser.add_argument("--keep-special-tokens", action="store_true",
                        help="also store BOS/EOS positions (dropped by default: their norms dwarf the rest)")
    parser.add_argument("--max-norm-ratio", type=float, default=None,
                        help="drop tokens whose norm exceeds R x the layer's median norm")
    parser.add_argument("--shard-tokens", type=int, default=None,
                        help="rows per shard (default: about 256 MB of activations)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted collection in --out")
    parser.add_argument("--force", action="store_true", help="replace the store in a non-empty --out")
    add_common_arguments(parser)


def parse_layers(text: str) -> list:
    from sae.errors import UserError
    layers = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            layers.append(int(part))
        except ValueError:
            raise UserError(f"--layers {text!r}: {part!r} is not a layer index") from None
    if not layers:
        raise UserError("--layers names no layer")
    return layers


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def run(args):
    import sys
    from pathlib import Path

    import torch

    from sae.collect import CollectOptions, collect
    from sae.errors import UserError
    if args.resume and args.force:
        raise UserError("--resume and --force contradict each other: pick one")
    if args.context_size is not None and args.context_size < 2:
        raise UserError(f"--context-size must be at least 2, got {args.context_size}")
    torch.manual_seed(args.seed)
    options = CollectOptions(
        model=args.model, layers=parse_layers(args.layers), site=args.site, dataset=args.dataset,
        out=Path(args.out), tokens=args.tokens, context_size=args.context_size, batch_size=args.batch_size,
        dtype=args.dtype, device=args.device, text_column=args.text_column, split=args.split,
        keep_special_tokens=args.keep_special_tokens, max_norm_ratio=args.max_norm_ratio,
        shard_tokens=args.shard_tokens, resume=args.resume, force=args.force)
    try:
        result = collect(options)
    finally:
        from sae import distributed
        distributed.teardown(clean=sys.exc_info()[0] is None)
    import os
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.exhausted and args.tokens is not None:
        print(f"warning: the dataset ran out after {result.n_tokens:,} rows (asked for {args.tokens:,}); "
              f"the store holds what there is", file=sys.stderr)
    layers = result.manifest.get("layers")
    print(f"wrote {result.n_tokens:,} rows x {len(layers)} layer{'s' if len(layers) != 1 else ''} {layers} "
          f"of {result.manifest.get('site')} to {result.path} ({human_bytes(result.size_bytes)}, "
          f"{result.n_shards} shard{'s' if result.n_shards != 1 else ''})")
    return 0
