"""`sae push RUN REPO`: upload a run folder to the Hugging Face Hub with a model card (sae.push)."""
import argparse

HELP = "upload a run folder to the Hugging Face Hub with a model card (RUN/README.md)"


def add_arguments(parser):
    parser.add_argument("run", metavar="RUN", help="a finished run folder (or a multi-layer live run's folder)")
    parser.add_argument("repo", metavar="REPO", help="the Hub repo, OWNER/NAME (created when missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="the branch to push to (default main)")
    parser.add_argument("--no-saelens", action="store_true",
                        help="do not add the SAELens layout (saelens/) beside the run")
    parser.add_argument("--endpoint", default=None, metavar="URL",
                        help="another Hub (default: HF_ENDPOINT, else huggingface.co)")
    parser.add_argument("--token", default=None, help=argparse.SUPPRESS)   # normally HF_TOKEN or `hf auth login`


def run(args):
    from sae.push import push
    url = push(args.run, args.repo, token=args.token, private=args.private, endpoint=args.endpoint,
               revision=args.revision, with_saelens=not args.no_saelens)
    print(f"pushed {args.run} to {url}")
    return 0
