"""`sae collect` (stub: to be written)."""
HELP = "collect (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae collect is not implemented yet")
