"""`sae export` (stub: to be written)."""
HELP = "export (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae export is not implemented yet")
