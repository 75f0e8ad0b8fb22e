"""`python -m xks_proxy.conformance ...`: the conformance tester without the rest of the CLI."""

import sys

from xks_proxy.conformance import main

sys.exit(main())
