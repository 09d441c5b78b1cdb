"""``python -m attn_compiler``: see :mod:`attn_compiler.cli`."""
from .cli import main

raise SystemExit(main())
