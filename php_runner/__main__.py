"""``python -m php_runner``: the php-run command line."""

from php_runner.cli import app

app(prog_name="php-run")
