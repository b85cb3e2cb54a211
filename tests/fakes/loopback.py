"""The fakes' HTTP server is the sandbox's (payfleet/sandbox/loopback.py)."""

from payfleet.sandbox.loopback import LoopbackHTTPServer, LoopbackServer, Reply

__all__ = ["LoopbackHTTPServer", "LoopbackServer", "Reply"]
