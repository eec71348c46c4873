"""What every entry point shares: arguments, recipe + overrides, process group, clean errors."""
from __future__ import annotations

import argparse
import signal
import sys

from .config import Recipe, describe, load_recipe
from .errors import UserError
from .redact import redact


def parse(description: str, add_args=None, argv=None) -> tuple[argparse.Namespace, Recipe]:
    """Parse RECIPE [a.b=c ...] plus whatever ``add_args(parser)`` declares."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help="recipe YAML (one file = one experiment)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. incubate.epochs=2 run.name=try2")
    if add_args:
        add_args(p)
    p.add_argument("--help-recipe", action="store_true", help="list every recipe key with its default")
    if argv is None:
        argv = sys.argv[1:]
    if "--help-recipe" in argv:
        print("\n".join(describe()))
        raise SystemExit(0)
    args = p.parse_intermixed_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except UserError as e:
        p.exit(2, redact(f"error: {e}\n"))
    return args, recipe


def main(run) -> None:
    """Run ``run()`` with user mistakes (``UserError``) turned into one clear line and exit code 2; any other
    error keeps its traceback."""
    from . import dist
    from .train import note_failure, request_stop
    # A preemption notice or the time limit (SIGUSR1 from sbatch --signal, SIGTERM from scancel, preemption and
    # torchrun, which forwards it): checkpoint at the next optimizer step and exit. Repeats change nothing
    # (request_stop); a hard stop is SIGKILL.
    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    # Past a file size limit (ulimit -f) a write fails (EFBIG) and is reported like a full disk, instead of the
    # default SIGXFSZ killing the process with a core dump mid-checkpoint.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    sys.excepthook = _redacted_traceback  # secrets of the environment never reach a log, not even in a traceback
    try:
        run()
    except UserError as e:
        print(redact(f"error: {e}"), file=sys.stderr, flush=True)
        note_failure(redact(f"error: {e}"))
        dist.shutdown()
        raise SystemExit(2)
    except Exception as e:
        note_failure(redact(f"{type(e).__name__}: {e}"))  # the traceback follows (sys.excepthook)
        raise
    dist.shutdown()


def _redacted_traceback(kind, value, tb) -> None:
    import traceback
    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
    sys.stderr.flush()


def phase_main(description: str, phase: str) -> None:
    """The entry point of a phase: ``launch/<phase>.py RECIPE [a.b=c ...]`` (one process or under torchrun)."""
    from . import dist, phases
    _, recipe = parse(description)
    main(lambda: phases.run_phase(recipe, phase, dist.init()))


def fraction(text: str, what: str) -> tuple[int, int]:
    """'p/P' -> (p, P) with 0 <= p < P; a clear exit otherwise."""
    try:
        p, P = (int(v) for v in text.split("/"))
        if 0 <= p < P:
            return p, P
    except ValueError:
        pass
    print(f"error: {what} {text!r} must be p/P with 0 <= p < P, e.g. 0/2", file=sys.stderr)
    raise SystemExit(2)


def phase_list(text: str) -> tuple[str, ...]:
    """'meta,e2e' -> ('meta', 'e2e'); a clear exit for an unknown phase."""
    from .config import PHASES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in PHASES]
    if bad or not names:
        print(f"error: --phases {text!r}: unknown phase(s) {bad}; choose from {', '.join(PHASES)}", file=sys.stderr)
        raise SystemExit(2)
    return names
