"""`sae analyze` (stub: to be written)."""
HELP = "analyze (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae analyze is not implemented yet")
