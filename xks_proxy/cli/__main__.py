"""`python -m xks_proxy.cli`: the same as the `xks-proxy` command (the tests run it this way)."""

import sys

from xks_proxy.cli.app import main

sys.exit(main())
