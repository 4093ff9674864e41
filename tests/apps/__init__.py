"""Small consumer modules the tests route to, as a user's project would have them."""
