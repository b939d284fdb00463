"""One module per subcommand; imported lazily by ``mediqa_cli.main.LazyGroup``."""
