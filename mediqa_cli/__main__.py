from mediqa_cli.main import cli

cli()
