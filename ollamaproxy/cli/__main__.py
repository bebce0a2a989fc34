# -*- test-case-name: tests.integration.test_cli_processes -*-
"""
C{python -m ollamaproxy.cli}: the C{ollamaproxy} command.
"""

from ollamaproxy.cli import main

raise SystemExit(main())
