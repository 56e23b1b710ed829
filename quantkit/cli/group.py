"""The ``quantkit`` group: how a command ends, in one place.

A library error (``QuantkitError``) closes the progress bars and ends the command with one line
and its exit code (2 bad input, 1 validation failed); a usage error with one line and 2; Ctrl-C /
SIGTERM with one line and 130 / 143; out of memory with one line and 2; anything else is a bug:
its traceback and 3. Commands just call the library and render what it returns.
"""
from __future__ import annotations

import sys

import click

from ..errors import QuantkitError

INTERNAL_ERROR = 3      # a bug: neither 1 (validation failed) nor 2 (bad input)
PROGRESS = "quantkit.progress"      # ctx.meta key of the command's progress bars


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``kill``), raised where Ctrl-C would be so the same cleanup runs."""


def _terminate(signum, frame):
    raise Terminated()


class _Group(click.Group):
    """Ctrl-C and SIGTERM end a command with one line and exit 130 / 143 (click alone prints
    "Aborted!" and exits 1, which quantkit uses for a failed validation). The exception unwinds
    through the writer first, which removes its temporary files: nothing half-written remains."""

    group_class = type        # subgroups ("quantkit stats") are _Groups too

    def parse_args(self, ctx, args):
        # a group asked for nothing shows its help and succeeds (click exits 2 and quantkit's one-line
        # usage error would print that help as "error: Usage: ..."); a wrong subcommand stays exit 2
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except QuantkitError as exc:         # bad input, refused options, a failed precondition: one line
            bars = ctx.meta.get(PROGRESS)
            if bars is not None:
                bars.close()
            _fail(exc)
        except click.UsageError as exc:      # one line, like every other refusal (click prints three)
            # the failing command's own path: "quantkit stats show", not the group's name and its own
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            raise click.exceptions.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            _stopped(exc)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except MemoryError:
            click.echo("error: out of memory (convert streams in any case; for validate --model-output, the model "
                       "must fit: validate per tensor, without --model-output, or on a machine with more memory)",
                       err=True)
            raise click.exceptions.Exit(2) from None
        except Exception as exc:      # noqa: BLE001 -- a bug, not bad input: the traceback is for the report
            _stopped(_interrupt_behind(exc))
            if "not enough memory" in str(exc):          # torch's allocator: "you tried to allocate N bytes"
                click.echo(f"error: out of memory: {str(exc).strip().splitlines()[0][:300]} (validate per tensor, "
                           "without --model-output, or use a machine with more memory)", err=True)
                raise click.exceptions.Exit(2) from None
            import traceback
            traceback.print_exc()
            click.echo(f"internal error (a bug in quantkit, not in your files): {type(exc).__name__}: {exc}; "
                       "please report it with the traceback above", err=True)
            raise click.exceptions.Exit(INTERNAL_ERROR) from None


def _fail(exc: QuantkitError) -> None:
    """End the command for a library error: one line and its exit code (or the Ctrl-C / SIGTERM
    it was raised from)."""
    _stopped(_interrupt_behind(exc))
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _stopped(exc: KeyboardInterrupt | None) -> None:
    """Ctrl-C or SIGTERM: one line and exit 130 / 143 (nothing when ``exc`` is None)."""
    if exc is None:
        return
    what, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
    click.echo(f"{what}: stopped; nothing half-written is left under the output's name", err=True)
    raise click.exceptions.Exit(code) from None


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C / SIGTERM an error was raised from: a C extension whose start-up the signal
    interrupted (scipy's, imported by transformers) reports "ImportError: initialization failed"
    caused by it, which is no bug of quantkit's."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def progress_bars(quiet: bool):
    """tqdm bars for the library's ``Progress`` callbacks (silent when not a terminal or --quiet),
    registered with the command's context so that an error closes them (``_Group.invoke``)."""
    from tqdm import tqdm

    from ..progress import Progress

    class Bars(Progress):
        bar = None

        def stage(self, name, total_bytes):
            self.close()
            self.bar = tqdm(total=total_bytes, desc=f"{name:>9}", unit="B", unit_scale=True,
                            disable=True if quiet else None, leave=False, file=sys.stderr)

        def advance(self, nbytes):
            if self.bar is not None:
                self.bar.update(nbytes)

        def close(self):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

        def warn(self, message):
            click.echo(f"warning: {message}", err=True)

    bars = Bars()
    click.get_current_context().meta[PROGRESS] = bars
    return bars


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="quantkit")
def main():
    """quantkit: FP8 (E4M3) checkpoints that are half the size of BF16 and provably faithful.

    \b
    Typical use:
      quantkit plan model.safetensors                      # what would happen, tensor by tensor
      quantkit convert model.safetensors model-fp8.safetensors
      quantkit validate model-fp8.safetensors --against model.safetensors --min-sqnr 30
    """
