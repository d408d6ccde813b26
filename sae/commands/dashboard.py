"""`sae dashboard` (stub: to be written)."""
HELP = "dashboard (not yet implemented)"


def add_arguments(parser):
    pass


def run(args):
    from sae.errors import UserError
    raise UserError("sae dashboard is not implemented yet")
