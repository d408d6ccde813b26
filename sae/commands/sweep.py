"""`sae sweep` (stub: to be written)."""
HELP = "sweep (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae sweep is not implemented yet")
