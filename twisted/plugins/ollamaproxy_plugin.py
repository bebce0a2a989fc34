"""
The twistd plugin: C{twistd ollamaproxy --help}.
"""

from twisted.application.service import ServiceMaker

ollamaproxy = ServiceMaker(
    "ollamaproxy",
    "ollamaproxy.tap",
    "An Ollama server that needs a key: an authenticating, streaming proxy for Ollama.",
    "ollamaproxy",
)
