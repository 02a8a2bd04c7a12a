"""Test suite; `tests.tiny` builds the tiny offline models the fixtures share."""
