"""The console command ``baichuan-finetune`` (see `main`): one module per subcommand, each with the
``main(argv) -> exit code`` that the matching scripts/*.py shim also calls."""
