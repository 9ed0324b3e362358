"""`python -m service.cli`: the same command line as the `segmentation` script."""
from service.cli.main import app

app()
