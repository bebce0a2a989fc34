# The proxy as a twistd application file: twistd -ny ollamaproxy.tac
#
# Configured by environment variables only (OLLAMAPROXY_LISTEN,
# OLLAMAPROXY_UPSTREAM or OLLAMA_HOST, OLLAMAPROXY_API_KEY,
# OLLAMAPROXY_KEYS_FILE, OLLAMAPROXY_LOG_DIR, ...; see the README).  The
# service is built by the same code as `twistd ollamaproxy`.

from twisted.application.service import Application

from ollamaproxy.tap import Options, makeService

options = Options()
options.parseOptions([])

application = Application("ollamaproxy")
makeService(options).setServiceParent(application)
