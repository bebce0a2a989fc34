# -*- test-case-name: tests.test_cli -*-
"""
C{python -m ollamaproxy.cli}: the C{ollamaproxy} command.
"""

from ollamaproxy.cli import main

raise SystemExit(main())
