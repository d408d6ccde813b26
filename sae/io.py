"""The older name of sae.runs (run folders: load, save, Hub); kept so that `sae.io.from_pretrained` and
`from sae.io import load` keep working."""
from sae.runs import (CONFIG, WEIGHTS, build_from_config, from_pretrained, git_commit, load,  # noqa: F401
                      model_card_text, package_version, push_to_hub, read_config, save_pretrained, save_run,
                      save_weights)
