"""
What the tests share: fakes (Ollama, Redis, agents, a worker), the in-memory
chain, and the starters of real processes and engines for the integration
tests.

Test modules import helpers from here and only from here, never from one
another (C{tests/test_layout.py} checks it): a helper in a test module is
found by nobody who needs it, and importing a test module runs its tests'
collection twice.
"""
