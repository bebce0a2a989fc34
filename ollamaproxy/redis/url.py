# -*- test-case-name: tests.redis.test_url -*-
"""
The Redis room's name for L{ollamaproxy.redis_address}, where C{--redis
URL} is read: the options read it in the base layer, and the room's modules
and tests keep importing it from here.
"""

from ollamaproxy.redis_address import RedisAddress as RedisAddress
from ollamaproxy.redis_address import parse_failure_policy as parse_failure_policy
from ollamaproxy.redis_address import parse_redis_url as parse_redis_url
