"""SIGTERM to an `edgeshard` command runs its cleanup (`finally`, context managers) and exits 143."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_sigterm_runs_the_commands_cleanup_and_exits_143():
    script = textwrap.dedent("""
        import argparse, os, signal, time
        from edgeshard_kit.cli import main as m

        def func(args):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                print("cleanup ran", flush=True)

        def build_parser(argv):
            p = argparse.ArgumentParser()
            p.set_defaults(func=func)
            return p

        m.build_parser = build_parser
        raise SystemExit(m.main([]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stderr
    assert "cleanup ran" in out.stdout and "edgeshard: terminated" in out.stderr
    assert "Traceback" not in out.stderr
