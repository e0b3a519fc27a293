"""The command line: a thin layer over the Python API.

It parses, calls ``auditor.scan`` / the policy gate / the report renderer,
and prints. Exit codes: 0 ran and passed, 1 a policy requirement failed,
2 usage or input error (one line on stderr; ``--debug`` shows the traceback).
A reader of standard output that goes early (``| head``) changes none of
them; standard output that cannot be written is an error (exit code 2).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import shlex
import signal
import sys
import traceback
from pathlib import Path

import click

from .access import DEFAULT_BUDGET, Access
from .eps import eps_text, parse_eps
from .errors import AuditError, printable, short_reason
from .report.formatting import percent

EXIT_PASS, EXIT_POLICY_FAILED, EXIT_ERROR = 0, 1, 2


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(value) for value in values):
        raise click.BadParameter(f"expected comma-separated finite numbers, got {text!r}", param_hint=option)
    return values


class Radius(click.ParamType):
    """An ε on the command line: ``0.03`` or ``8/255``."""

    name = "eps"

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            return value
        try:
            return parse_eps(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


RADIUS = Radius()

_OUTPUTS = "auditor.outputs"
"""Key in the click context's ``meta``: the output paths of the command being run."""


class OutputPath(click.Path):
    """A path the command writes (``--out``, ``--junit``); not empty. Remembered, so that an
    OSError on it, inside it or on a folder above it reads
    ``cannot write to PATH: reason`` (see :class:`AuditorGroup`)."""

    def convert(self, value, param, ctx):
        if value == "":  # would write into the working directory
            self.fail("the path is empty", param, ctx)
        path = super().convert(value, param, ctx)
        if ctx is not None:
            ctx.meta.setdefault(_OUTPUTS, []).append(Path(path))
        return path


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def _output_error(exc: OSError, outputs: list[Path]) -> AuditError | None:
    """The one-line error for an OSError met writing one of ``outputs``, or
    None when it is not about them."""
    failed = [Path(os.path.abspath(name)) for name in (exc.filename, exc.filename2)
              if isinstance(name, (str, os.PathLike))]
    for output in outputs:
        target = Path(os.path.abspath(output))
        if any(path == target or target in path.parents or path in target.parents for path in failed) or (
            not failed and exc.errno in _WRITE_ERRNOS
        ):
            return AuditError(f"cannot write to {output}: {exc.strerror or short_reason(exc)}")
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, CI cancellation), raised where the program is so
    that cleanup runs as for Ctrl-C."""


def _terminate(signum, frame) -> None:
    raise Terminated


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during a command, carried past click, which would
    otherwise print a bare newline and raise :class:`click.exceptions.Abort`."""


def _discard_stdout() -> None:
    """Point standard output at os.devnull, as Python's documentation advises
    for SIGPIPE: what is left in its buffer, later lines and the
    interpreter's flush at exit then go nowhere instead of failing again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _echo(text: str = "") -> None:
    """Print ``text``, a line of a command's output, on standard output.

    A reader gone before the end (``| head``) does not end the command: the
    rest of its output is discarded and its exit code stays its own (its
    files are written). Any other error writing there (a full disk) is an
    input error naming standard output, not one of the command's files.
    """
    try:
        click.echo(text)
    except OSError as exc:
        _stdout_failed(exc)


def _stdout_failed(exc: OSError) -> None:
    """Handle ``exc``, met writing standard output: discard the rest of the
    output; a closed pipe is then dealt with, anything else raised as an
    input error naming standard output."""
    _discard_stdout()
    if not isinstance(exc, BrokenPipeError):
        raise AuditError(f"cannot write to standard output: {exc.strerror or short_reason(exc)}") from exc


class HelpOnStdout:
    """For the group and its commands: ``--help`` prints while the command
    line is parsed, where a closed standard output would reach click, which
    exits 1; it is handled as the commands' own output is (:func:`_echo`)."""

    def parse_args(self, ctx, args):
        """Parse ``args`` (printing the help for ``--help``)."""
        try:
            return super().parse_args(ctx, args)
        except OSError as exc:  # nothing else writes (or opens a file) while parsing
            _stdout_failed(exc)
            ctx.exit(EXIT_PASS)


class AuditorCommand(HelpOnStdout, click.Command):
    """A command of the group (see :class:`HelpOnStdout`)."""


class AuditorGroup(HelpOnStdout, click.Group):
    """The command group; an OSError writing a command's outputs is bad
    input (an unwritable ``--out``), reported as one line with exit code 2;
    an interruption is passed on as :class:`Interrupted`."""

    command_class = AuditorCommand

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as exc:
            raise Interrupted("terminated" if isinstance(exc, Terminated) else "interrupted") from exc
        except OSError as exc:
            error = _output_error(exc, ctx.meta.get(_OUTPUTS, []))
            if error is None:
                raise
            raise error from exc


def _echo_summary(results: dict) -> None:
    threat = results["threat"]
    _echo(printable(f"access: {results['access']['level']} ({results['access']['reason']})"))
    _echo(f"clean accuracy: {percent(results['clean_accuracy'])} on {results['data']['n']} samples")
    for eps, value in results["robust_accuracy"].items():
        _echo(f"robust accuracy at {threat['norm']} eps={eps_text(eps)}: {percent(value)}")
    _echo_checks(results["checks"])


def _echo_checks(checks: list[dict]) -> None:
    for check in checks:
        _echo(printable(f"check [{check['level']}] {check['id']}: {check['message']}"))


def _echo_policy(policy: dict) -> None:
    """The verdicts, one line each; names and ids come from the policy file,
    so their control characters are shown as escapes."""
    for requirement in policy["requirements"]:
        mark = "PASS" if requirement["passed"] else "FAIL"
        _echo(printable(
            f"{mark}  {requirement['id']}: {requirement['description']} (actual: {requirement['actual']})"
        ))
    _echo(printable(f"policy {policy['name']}: {'passed' if policy['passed'] else 'FAILED'}"))


def _exit_code(results: dict) -> int:
    policy = results.get("policy")
    return EXIT_POLICY_FAILED if policy is not None and not policy["passed"] else EXIT_PASS


@click.group(cls=AuditorGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors (may be given anywhere).")
def cli(debug: bool) -> None:
    """auditor: audit an image classifier's robustness under a threat model."""


@cli.command(epilog="Example: auditor scan examples/mnist_cnn.onnx --access hard-label --data mnist -n 100 --budget 2000 --out out/scan")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--access", default="auto", show_default=True,
              type=click.Choice(["auto", *(level.cli_name for level in reversed(Access))]),
              help="What the attacker can see; auto takes the most the model file allows.")
@click.option("--data", default="mnist", show_default=True, help="mnist, a .npz with x and y, or an image folder.")
@click.option("-n", "--samples", type=int, help="Evaluate a class-balanced subset of N samples.")
@click.option("--norm", default="linf", show_default=True, type=click.Choice(["linf", "l2"]))
@click.option("--eps", type=RADIUS, multiple=True,
              help="Perturbation radius, e.g. 0.3 or 8/255 (repeatable). Default: 0.1, 0.2, 0.3 (linf) or "
                   "1, 1.5, 2 (l2) for greyscale images up to 32x32; else 2/255, 4/255, 8/255 or 0.25, 0.5, 1.")
@click.option("--budget", type=int, default=DEFAULT_BUDGET, show_default=True,
              help="Queries per sample for each run of a black-box attack: a fixed-eps attack runs once per eps, "
                   "a minimum-norm attack once for all eps.")
@click.option("--attacks", help="Comma-separated attack names (see `auditor attacks`); a name without its norm "
              "(fgsm, sign-opt) means the threat norm's variant. Default: the whole battery.")
@click.option("--target", help="Targeted audit: random, least-likely or a class index (targeted attacks only).")
@click.option("--surrogate", "surrogates", multiple=True, type=click.Path(dir_okay=False),
              help="Surrogate model for transfer attacks (repeatable, each file once): TorchScript, .pt2 or "
              "ONNX with the model's classes and its own normalisation; a pickle with --trust-pickle. Named "
              "after the file, with as many parent folders as tell it apart from the other surrogates.")
@click.option("--train-surrogates", type=int, default=0, show_default=True,
              help="Train K surrogates (MLP, CNN, ResNet-style, cached) on the built-in training split.")
@click.option("--arch", help="module:factory building the network, for weights files.")
@click.option("--mean", help="Per-channel mean folded into the model, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Per-channel std folded into the model.")
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (runs code from the file!).")
@click.option("--policy", help="Policy YAML (or a shipped name: default, strict) to gate on.")
@click.option("--out", type=OutputPath(file_okay=False), help="Folder for results.json and the reports.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.pass_obj
def scan(command, model, access, data, samples, norm, eps, budget, attacks, target, surrogates, train_surrogates,
         arch, mean, std, trust_pickle, policy, out, seed, device):
    """Run the attack battery on MODEL and verify every adversarial example."""
    from .scan import scan as run_scan

    audit = run_scan(
        model, data, access=access, samples=samples, norm=norm, eps=eps or None, budget=budget,
        attacks=[name.strip() for name in attacks.split(",")] if attacks is not None else None, target=target,
        surrogates=surrogates, train_surrogates=train_surrogates,
        arch=arch, mean=_floats(mean, "--mean"), std=_floats(std, "--std"), trust_pickle=trust_pickle,
        policy=policy, out=out, seed=seed, device=device, progress=sys.stderr.isatty(),
        command=command,
    )
    _echo_summary(audit.results)
    if "policy" in audit.results:
        _echo_policy(audit.results["policy"])
    if out:
        _echo_written(out)
    return _exit_code(audit.results)


def _echo_written(out: str | Path) -> None:
    """The line naming a scan's outputs in ``out`` (junit.xml is there only
    with a policy: the scan removes an earlier run's)."""
    from .scan import OUTPUT_ORDER

    others = [name for name in OUTPUT_ORDER if name != "results.json" and (Path(out) / name).is_file()]
    _echo(f"wrote {Path(out) / 'results.json'}, {', '.join(others[:-1])} and {others[-1]}")


@cli.command(epilog="Example: auditor harden examples/mnist_cnn.onnx --data mnist --eps 0.3 --out out/harden")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", default="mnist", show_default=True,
              help="Training data: mnist (its train split), a .npz with x and y, or an image folder.")
@click.option("--eps", type=RADIUS, required=True, help="Training and evaluation radius, e.g. 0.3 or 8/255.")
@click.option("--norm", default="linf", show_default=True, type=click.Choice(["linf", "l2"]))
@click.option("--method", default="fast", show_default=True, type=click.Choice(["fast", "pgd", "free"]),
              help="fast: FGSM with random start (Wong et al. 2020); pgd: PGD-k (Madry et al. 2018); "
                   "free: m replays (Shafahi et al. 2019).")
@click.option("--epochs", type=int,
              help="Training epochs (default 20): passes over the training data; free makes "
                   "⌈epochs/replays⌉ passes, each minibatch replayed --replays times.")
@click.option("--out", required=True, type=OutputPath(file_okay=False),
              help="Folder for the hardened model, before/ and after/ scans, hardening.json and the report.")
@click.option("--no-guard", is_flag=True,
              help="Experiments only: never roll back on catastrophic overfitting.")
@click.option("--eval-data",
              help="Data for the before/after scans; default: --data (the test split for mnist).")
@click.option("-n", "--samples", type=int, help="Scan a class-balanced subset of N samples.")
@click.option("--budget", type=int, default=DEFAULT_BUDGET, show_default=True,
              help="Queries per sample for the scans' black-box attacks.")
@click.option("--batch-size", type=int, help="Minibatch size (default 50).")
@click.option("--lr-max", type=float, help="Peak of the cyclic learning rate (default 5e-3).")
@click.option("--eps-warmup", type=float, help="Fraction of training over which ε ramps up (default 0.4).")
@click.option("--alpha", type=float,
              help="Attack step as a multiple of the training radius, --eps × --eps-scale "
                   "(fast 1.5, i.e. 1.8·ε at its default scale 1.2; pgd 4/(3·steps), 1/30 at 40 steps; free 1).")
@click.option("--eps-scale", type=float,
              help="Training radius as a multiple of --eps (fast 1.2, pgd and free 1).")
@click.option("--steps", type=int, help="pgd: attack steps per batch (default 40).")
@click.option("--replays", type=int, help="free: replays per minibatch (default 8).")
@click.option("--zero-init", is_flag=True,
              help="fast: start FGSM from zero instead of a random point (experiments).")
@click.option("--clip-to-box", is_flag=True, help="Clip the training adversary's images to [0,1].")
@click.option("--guard-size", type=int, help="Training images held out for the guard (default 256).")
@click.option("--guard-every", type=int, help="Updates between guard checks in long epochs (default 200).")
@click.option("--guard-drop", type=float,
              help="PGD accuracy drop from its best that trips the guard (default 0.2).")
@click.option("--arch", help="module:factory building the network, for weights files.")
@click.option("--mean", help="Per-channel mean folded into the model, e.g. 0.485,0.456,0.406.")
@click.option("--std", help="Per-channel std folded into the model.")
@click.option("--trust-pickle", is_flag=True, help="Allow a pickled nn.Module (runs code from the file!).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]))
@click.pass_obj
def harden(command, model, data, eps, norm, method, out, no_guard, eval_data, samples, budget,
           mean, std, arch, trust_pickle, seed, device, zero_init, clip_to_box, **options):
    """Adversarially fine-tune MODEL and write it, hardened, in its own format.

    Also scans the model before and after (white-box, same settings) and
    writes hardening.json and a report with a Hardening section.
    """
    from .harden import harden as run_harden

    options = {key: value for key, value in options.items() if value is not None}
    if zero_init:
        options["random_init"] = False
    if clip_to_box:
        options["clip_to_box"] = True
    result = run_harden(
        model, data, eps=eps, out=out, norm=norm, method=method, guard=not no_guard,
        seed=seed, eval_data=eval_data, samples=samples, budget=budget, arch=arch, mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"), trust_pickle=trust_pickle, device=device, progress=sys.stderr.isatty(),
        command=command, **options,
    )
    record = result.record
    before, after = record["before"], record["after"]
    seconds = record["training_seconds"]
    unit = "epochs" if record["method"]["params"].get("replays") is None else "passes over the data"
    _echo(f"{record['method']['label']}: {record['epochs_run']} of {record['epochs_planned']} {unit} "
          f"in {seconds:.1f} s")
    _echo(f"clean accuracy: {percent(before['clean_accuracy'])} -> {percent(after['clean_accuracy'])}")
    for key, value in after["robust_accuracy"].items():
        was = before["robust_accuracy"][key]
        _echo(f"robust accuracy at {norm} eps={eps_text(key)}: {percent(was)} -> {percent(value)}")
    for event in result.guard_events:
        _echo(f"guard: {event['message']}")
    _echo_checks([check for check in result.after.results["checks"] if check["level"] != "info"])
    _echo(f"wrote {result.model_path}, hardening.json, results.json, report.html and report.pdf")
    return EXIT_PASS


@cli.command(epilog="Example: auditor check out/scan/results.json --policy strict --junit junit.xml")
@click.argument("results_path", metavar="RESULTS", type=click.Path(dir_okay=False))
@click.option("--policy", required=True, help="Policy YAML, or a shipped name: default, strict.")
@click.option("--junit", type=OutputPath(dir_okay=False), help="Write one JUnit testcase per requirement here.")
def check(results_path, policy, junit):
    """Apply a policy to a results.json; exit 1 if a requirement fails."""
    from .policy import load_policy, resolve_policy_path, write_junit
    from .report.schema import read_results

    if junit:
        policy_file = policy
        with contextlib.suppress(AuditError):  # an unknown policy fails below, after the unlink
            policy_file = resolve_policy_path(policy)
        for given, name in ((results_path, "RESULTS"), (policy_file, "the policy file")):
            if Path(given).is_file() and Path(junit).is_file() and Path(junit).samefile(given):
                raise AuditError(f"--junit {junit} is {name}: give another path for the JUnit file")
        # a verdict of an earlier run must not outlive a run that fails
        # before writing its own: CI would publish the old one
        Path(junit).unlink(missing_ok=True)
    gate = load_policy(policy)
    verdict = gate.evaluate(read_results(results_path))
    _echo_policy(verdict.to_dict())
    if junit:
        write_junit(verdict, Path(junit))
    return EXIT_PASS if verdict.passed else EXIT_POLICY_FAILED


@cli.command(epilog="Example: auditor report out/scan/results.json --out out/rerendered")
@click.argument("results_path", metavar="RESULTS", type=click.Path(dir_okay=False))
@click.option("--out", required=True, type=OutputPath(file_okay=False), help="Folder for report.html and report.pdf.")
def report(results_path, out):
    """Re-render report.html and report.pdf from a results.json."""
    from .report.render import write_report
    from .report.schema import read_results

    results = read_results(results_path)
    html, pdf = write_report(results, Path(out), source=results_path)  # creates out only once built
    _echo(f"wrote {html} and {pdf}")
    return EXIT_PASS


@cli.command(epilog="Example: auditor attacks")
def attacks():
    """List the attack catalogue: name, access level, norm, kind, default, targeted, paper.

    The default column: yes, in the default battery at its own access level
    and above; own level, only when the scan's level is its own; up to a
    level, at its own level and above up to that one; no, only when named in
    --attacks. Transfer attacks (access none) run only when the scan has
    surrogate models.
    """
    from .attacks import CATALOGUE

    width = max(len(attack.label) for attack in CATALOGUE)
    _echo(f"{'name':<{width}} {'access':<11} {'norm':<5} {'kind':<9} {'default':<13} {'targeted':<8} paper")
    for attack in CATALOGUE:
        if not attack.in_default_battery:
            default = "no"
        elif attack.default_up_to == Access.WHITE_BOX:
            default = "yes"
        elif attack.default_up_to == attack.access:
            default = "own level"
        else:
            default = f"to {attack.default_up_to.cli_name}"
        targeted = "yes" if attack.targeted else "no"
        _echo(
            f"{attack.label:<{width}} {attack.access.cli_name:<11} {attack.norm:<5} "
            f"{attack.kind:<9} {default:<13} {targeted:<8} {attack.paper}"
        )
    return EXIT_PASS


@cli.command(epilog="Example: auditor demo --out out/demo")
@click.option("--out", default="out/demo", show_default=True, type=OutputPath(file_okay=False))
@click.option("--model", "model_path", type=click.Path(dir_okay=False),
              help="Audit this model instead of the example model shipped with auditor.")
@click.option("-n", "--samples", type=int, default=200, show_default=True)
@click.pass_obj
def demo(command, out, model_path, samples):
    """Audit the example MNIST CNN on the built-in data and write a report.

    The example model is examples/mnist_cnn.onnx of the repository, shipped
    inside the package, so the demo runs from any directory. The default
    policy is applied and its verdict shown in the report; the demo exits 0
    whenever it ran, whatever the verdict.
    """
    from .resources import example_model
    from .scan import scan as run_scan

    if model_path is None:
        model_path = example_model()
        if not model_path.exists():  # a clone whose examples/ lost it; `make demo` trains it again
            raise AuditError(
                f"example model {model_path} not found: run `make demo` from a clone of the repository"
            )
    audit = run_scan(model_path, "mnist", samples=samples, policy="default", out=out,
                     progress=sys.stderr.isatty(), command=command)
    _echo_summary(audit.results)
    _echo_policy(audit.results["policy"])
    _echo_written(out)
    return EXIT_PASS


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI, turning errors into one line and exit code 2.

    Ctrl-C and SIGTERM end the command the same way: its cleanup runs and
    ``error: interrupted`` (``error: terminated``) is printed.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [arg for arg in args if arg != "--debug"]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)
    if not debug:  # library warnings (torch, weasyprint) would break the one-line contract
        for noisy in ("py.warnings", "weasyprint", "fontTools"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        command = " ".join(["auditor", *(shlex.quote(arg) for arg in args)])
        code = cli.main(args=args, prog_name="auditor", standalone_mode=False, obj=command)
    except Interrupted as exc:
        click.echo(f"error: {exc}", err=True)
        code = EXIT_ERROR
    except (click.exceptions.Abort, KeyboardInterrupt):  # interrupted outside a command
        click.echo("error: interrupted", err=True)
        code = EXIT_ERROR
    except click.exceptions.NoArgsIsHelpError as exc:  # bare `auditor`: the help, not an "error: Usage" line
        click.echo(exc.format_message(), err=True)
        code = EXIT_ERROR
    except Exception as exc:
        if debug:  # the whole traceback, and still the error exit code
            traceback.print_exc()
        elif isinstance(exc, click.ClickException):
            click.echo(f"error: {printable(exc.format_message())}", err=True)
        elif isinstance(exc, AuditError):  # may quote an input file (a policy, an ONNX input name)
            click.echo(f"error: {printable(str(exc))}", err=True)
        else:  # an internal bug: still one line unless --debug
            message = f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)"
            click.echo(f"error: {printable(message)}", err=True)
        code = EXIT_ERROR
    signal.signal(signal.SIGTERM, previous)
    sys.exit(code if isinstance(code, int) else EXIT_PASS)
