# The proxy as a twistd application file: twistd -ny ollamaproxy.tac
#
# Configured by environment variables only: one for each option of
# `twistd ollamaproxy` (OLLAMAPROXY_LISTEN, OLLAMAPROXY_UPSTREAM or
# OLLAMA_HOST, OLLAMAPROXY_API_KEY, ...), all listed in
# docs/configuration.md.  Options() reads them from the same table as the
# twistd plugin, and the service is built by the same code.

from twisted.application.service import Application

from ollamaproxy.tap import Options, makeService

options = Options()
options.parseOptions([])

application = Application("ollamaproxy")
makeService(options).setServiceParent(application)
