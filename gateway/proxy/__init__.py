"""How a request crosses: the proxy, forwarding rules, the upstream client, the relay, the worker class."""
