"""Server tokens (REGISTRATION_BINDING=token): made at random, shown once, kept only as a hash."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

HASH_PATTERN = re.compile(r"\Asha256:[0-9a-f]{64}\Z")


def new_token() -> str:
    """A fresh server token: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the state file keeps of a token.

    SHA-256 is enough here, with no salt or slow hash: a token holds 256 random bits, so
    there is no dictionary to try against a stolen hash.
    """
    # surrogatepass: a JSON body may carry lone surrogates ("\ud800"); they must fail, not crash.
    return "sha256:" + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def token_matches(presented: str | None, stored: str) -> bool:
    """Whether `presented` is the token `stored` is the hash of, compared in constant time."""
    return presented is not None and hmac.compare_digest(token_hash(presented), stored)
