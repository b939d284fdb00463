"""Entry point ``mediqa``. Subcommands are imported lazily so ``mediqa --help`` never imports torch."""

from __future__ import annotations

import importlib
import logging
import sys

import click

# name -> "module:attribute"; every module lives in mediqa_cli.commands and owns one command.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scan": ("mediqa_cli.commands.scan:scan", "Dry run: list the studies under ROOT, their prompts, flags and problems."),
    "score": ("mediqa_cli.commands.score:score", "Batch-score every study under ROOT into a CSV/JSONL report."),
    "report": ("mediqa_cli.commands.report:report", "Render one or more score CSVs into a self-contained HTML report."),
    "train": ("mediqa_cli.commands.train:train", "Pretrain, fine-tune or train the prompt classifier."),
    "evaluate": ("mediqa_cli.commands.evaluate:evaluate", "SRCC / PLCC / KROCC / RMSE of a model on a labelled dataset."),
    "synth": ("mediqa_cli.commands.synth:synth", "Generate the physics-based synthetic sample corpus."),
    "export": ("mediqa_cli.commands.export:export", "Export a model to ONNX / TensorRT / int8 with parity checks."),
    "info": ("mediqa_cli.commands.info:info", "Versions, available DICOM decoders and runtimes."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported only when invoked (or their own --help is asked)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in SUBCOMMANDS:
            return None
        target, _ = SUBCOMMANDS[cmd_name]
        mod_name, attr = target.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name == mod_name:
                return None  # not implemented in this build
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Short help from the table above so listing commands imports nothing heavy.
        rows = [(name, SUBCOMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def setup_logging(verbosity: int) -> None:
    """Log to stderr (cron mails or redirects it); every record passes the PHI scrubber."""
    from engines.privacy import install_log_scrubber  # light: stdlib only

    level = logging.WARNING if verbosity < 0 else logging.INFO if verbosity == 0 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    install_log_scrubber(root)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mediqa", prog_name="mediqa")
@click.option("--log-level", type=click.Choice(["quiet", "info", "debug"]), default="info",
              show_default=True, envvar="MEDIQA_LOG_LEVEL",
              help="Global log verbosity (stderr). Logs never contain patient identifiers.")
def cli(log_level: str) -> None:
    """MedIQA: prompt-driven medical image quality assessment.

    \b
    Typical night:  mediqa score /data/studies -o scores.csv --report report.html
    Audit only:     mediqa scan /data/studies -o scan.csv
    """
    setup_logging({"quiet": -1, "info": 0, "debug": 1}[log_level])


if __name__ == "__main__":  # pragma: no cover
    cli()
