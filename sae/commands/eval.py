"""`sae eval` (stub: to be written)."""
HELP = "eval (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae eval is not implemented yet")
