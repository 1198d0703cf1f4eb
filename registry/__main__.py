"""`python -m registry`: the registry CLI without `materialize` (that needs the model code:
use `python -m service.registry_cli materialize`)."""

from registry.cli import main

raise SystemExit(main())
