"""`sae train` (stub: to be written)."""
HELP = "train (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae train is not implemented yet")
