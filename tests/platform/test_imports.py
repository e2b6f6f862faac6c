import subprocess
import sys


def test_hooks_and_commands_do_not_load_the_database_stack():
    """herd.server imports the meter hooks, and herd/cli.py registers the commands, on every start:
    neither may pull in SQLAlchemy, Alembic or psycopg until a platform command or server runs."""
    code = (
        "import sys, argparse, herd.platform.meter, herd.platform.commands as c\n"
        "c.add_arguments(argparse.ArgumentParser().add_subparsers())\n"
        "bad = [m for m in ('sqlalchemy', 'alembic', 'psycopg') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
