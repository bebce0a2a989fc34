"""
The twistd plugin (C{twistd ollamaproxy --help}), and the C{reuseport:}
endpoint for C{--listen}.
"""

from twisted.application.service import ServiceMaker

from ollamaproxy.reuseport import ReusePortParser

ollamaproxy = ServiceMaker(
    "ollamaproxy",
    "ollamaproxy.tap",
    "An Ollama server that needs a key: an authenticating, streaming proxy for Ollama.",
    "ollamaproxy",
)

reuseport = ReusePortParser()
