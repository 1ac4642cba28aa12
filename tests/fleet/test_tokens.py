"""Server tokens: random, kept as a hash, compared in constant time."""

import pytest

from gateway.fleet.tokens import HASH_PATTERN, new_token, token_hash, token_matches


def test_tokens_are_random_and_url_safe():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(token) == 43 and token.isascii() and " " not in token for token in tokens)


def test_the_hash_is_what_the_state_file_may_hold():
    token = new_token()
    assert HASH_PATTERN.match(token_hash(token))
    assert token not in token_hash(token)


@pytest.mark.parametrize("presented", [None, "", "guess", "\ud800"])
def test_only_the_token_itself_matches(presented):
    token = new_token()
    assert token_matches(token, token_hash(token))
    assert not token_matches(presented, token_hash(token))
    assert not token_matches(token[:-1], token_hash(token))
